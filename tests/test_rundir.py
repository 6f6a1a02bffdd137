"""The run layer: one schema for trained, fine-tuned and imported runs, one way to load any of them, and folders
written before it (tests/data/legacy, made by commit 6c7e0db) still loading, sampling and resuming."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.core.config import FinetuneConfig, SamplingParams, load_config
from lmlab.core.errors import UserError
from lmlab.inference.generate import instruct, sample
from lmlab.run.rundir import STATE_FORMAT, RunDir
from lmlab.train.finetune import finetune
from lmlab.train.loop import Trainer
from tests.conftest import ALPACA_TINY, lmlab, write_config

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.mark.parametrize("name, kind, step", [("trained", "trained", 10), ("imported", "imported", 0),
                                              ("finetuned", "fine-tuned", 9)])
def test_a_folder_written_before_the_run_layer_loads(name, kind, step):
    run = RunDir(LEGACY / name).load("best", "cpu")
    assert (run.kind, run.step, run.checkpoint) == (kind, step, "best")
    assert (run.prompt_format is not None) == (kind == "fine-tuned")
    ids = torch.tensor([run.tokenizer.encode("ROMEO: sweet")])
    assert torch.isfinite(run.model(ids)[0]).all() and not run.model.training
    text = sample(run, "ROMEO:", SamplingParams(max_new_tokens=20, seed=3))
    assert text.startswith("ROMEO:") and text == sample(run, "ROMEO:", SamplingParams(max_new_tokens=20, seed=3))
    if kind == "fine-tuned":  # asked in the format it was taught, which ends its answers at end-of-text
        assert run.prompt_format.end == "<|endoftext|>"
        assert "<|endoftext|>" not in instruct(run, "Name a colour.", "", SamplingParams(max_new_tokens=30))


def test_a_trained_run_written_before_the_run_layer_resumes(tmp_path, stable_root, monkeypatch):
    """The legacy run was trained on `stable_root`'s dataset (its config names it data/tiny-char): the same
    train.bin, so it resumes without --force, continuing its progress, guard and loss means from the old
    state.json."""
    monkeypatch.chdir(stable_root)
    run = tmp_path / "trained"
    shutil.copytree(LEGACY / "trained", run)
    result = Trainer(RunDir(run).config(["train.max_iters=15"]), run, "cpu", resume=True).run()
    events = RunDir(run).events()
    assert result.steps == 15 and [e["step"] for e in events if e["event"] == "eval"] == [5, 10, 15]
    state = json.loads((RunDir(run).checkpoint("latest") / "state.json").read_text())
    assert state["format"] == STATE_FORMAT and state["kind"] == "trained" and state["training"]["progress"]["step"] == 15
    assert events[0].get("kind") is None and RunDir(run).kind() == "trained"  # the old start event stays as it was


@pytest.mark.slow
def test_every_kind_of_run_is_written_in_one_schema(tmp_path, char_dataset, imported_gpt2):
    trained = Trainer(load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)),
                      tmp_path / "trained", "cpu").run().run_dir
    tuned = finetune(imported_gpt2, tmp_path / "tuned", FinetuneConfig(str(ALPACA_TINY), epochs=1),
                     device="cpu").run_dir
    runs = {"trained": RunDir(trained), "imported": RunDir(imported_gpt2), "fine-tuned": RunDir(tuned)}
    starts = {kind: run.events()[0] for kind, run in runs.items()}
    assert len({tuple(sorted(start)) for start in starts.values()}) == 1  # the same keys for every kind
    for kind, run in runs.items():
        assert starts[kind]["kind"] == run.kind() == kind
        assert starts[kind]["flops_per_token"] == run.load("best", "cpu").model.flops_per_token()
        state = json.loads((run.checkpoint("best") / "state.json").read_text())
        assert {"format", "kind", "lmlab_version", "model_config", "training", "step", "optimizer", "files"} == \
            set(state) and state["kind"] == kind
    assert starts["fine-tuned"]["origin"]["train_records"] == 72 and starts["trained"]["origin"] is None
    assert math.isfinite(starts["trained"]["peak_flops"]) and starts["imported"]["peak_flops"] is None


def test_resume_refuses_runs_that_were_not_trained(tmp_path):
    for name, why in (("finetuned", "made by `lmlab finetune`"), ("imported", "was imported")):
        with pytest.raises(UserError, match=why):
            Trainer(RunDir(LEGACY / name).config(), LEGACY / name, "cpu", resume=True)


def test_loading_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="is not an lmlab run"):
        RunDir(tmp_path).load()
    with pytest.raises(UserError, match="checkpoint 'newest' is unknown"):
        RunDir(LEGACY / "trained").load("newest")
    bare = tmp_path / "bare"
    shutil.copytree(LEGACY / "imported", bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer"):
        RunDir(bare).load("best", "cpu")
    assert RunDir(bare).load("best", "cpu", need_tokenizer=False).tokenizer is None


def test_samples_are_recorded_by_the_run_layer_with_how_they_were_drawn(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "trained", run)
    out = lmlab("sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "4", "--top-p", "0.9",
                "--device", "cpu", cwd=tmp_path).stdout
    header, text = (run / "samples.txt").read_text().split("\n", 1)
    assert header == "--- checkpoint best (step 10), seed 4, temperature 0.8, top_k None, top_p 0.9, prompt 'ROMEO:'"
    assert text.strip() == out.strip()
