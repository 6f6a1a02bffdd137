"""The run layer: one schema for trained, fine-tuned and imported runs, one way to load any of them, and folders
written before it (tests/data/legacy, made by commit 6c7e0db) still loading, sampling and resuming; metrics.jsonl as
standard JSON."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from lmlab.analysis.runs import summarize
from lmlab.commands import main
from lmlab.core.config import FinetuneConfig, SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.inference.generate import instructing, sample, text_stream
from lmlab.run.rundir import STATE_FORMAT, RunDir
from lmlab.train.finetune import finetune
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import ALPACA_TINY, run_cli, spawn, wait_until, write_config

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
        answer = text_stream(run, instructing(run, [("Name a colour.", "")]), SamplingParams(max_new_tokens=30))
        assert "<|endoftext|>" not in answer.text()


@pytest.mark.slow
def test_a_trained_run_written_before_the_run_layer_resumes(tmp_path, stable_root, monkeypatch):
    """The legacy run was trained on `stable_root`'s dataset (its config names it data/tiny-char): the same
    train.bin, so it resumes without --force, continuing its progress, guard and loss means from the old
    state.json."""
    monkeypatch.chdir(stable_root)
    run = tmp_path / "trained"
    shutil.copytree(LEGACY / "trained", run)
    result = Trainer(train_job(RunDir(run).config(["train.max_iters=15"]), run, "cpu", resume=True)).run()
    events = RunDir(run).events()
    assert result.steps == 15 and [e["step"] for e in events if e["event"] == "eval"] == [5, 10, 15]
    state = json.loads((RunDir(run).checkpoint("latest") / "state.json").read_text())
    assert state["format"] == STATE_FORMAT and state["kind"] == "trained"
    assert state["training"]["progress"]["step"] == 15
    assert events[0].get("kind") is None and RunDir(run).kind() == "trained"  # the old start event stays as it was


@pytest.mark.slow
def test_every_kind_of_run_is_written_in_one_schema(tmp_path, char_dataset, imported_gpt2):
    trained = Trainer(train_job(load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)),
                      tmp_path / "trained", "cpu")).run().run_dir
    tuned = finetune(imported_gpt2, tmp_path / "tuned", FinetuneConfig(str(ALPACA_TINY), epochs=1),
                     device="cpu").run_dir
    runs = {"trained": RunDir(trained), "imported": RunDir(imported_gpt2), "fine-tuned": RunDir(tuned)}
    starts = {kind: run.events()[0] for kind, run in runs.items()}
    assert len({tuple(sorted(start)) for start in starts.values()}) == 1  # the same keys for every kind
    for kind, run in runs.items():
        assert starts[kind]["kind"] == run.kind() == kind
        assert starts[kind]["flops_per_token"] == run.load("best", "cpu").model.flops_per_token()
        state = json.loads((run.checkpoint("best") / "state.json").read_text())
        assert set(state) == {"format", "kind", "lmlab_version", "model_config", "settings", "training", "step",
                              "optimizer", "files"} and state["kind"] == kind
    assert starts["fine-tuned"]["origin"]["train_records"] == 72 and starts["trained"]["origin"] is None
    assert math.isfinite(starts["trained"]["peak_flops"]) and starts["imported"]["peak_flops"] is None


def test_resume_refuses_runs_that_were_not_trained(tmp_path):
    for name, why in (("finetuned", "made by `lmlab finetune`"), ("imported", "was imported")):
        with pytest.raises(UserError, match=why):
            Trainer(train_job(RunDir(LEGACY / name).config(), LEGACY / name, "cpu", resume=True))


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
    assert RunDir(bare).load("best", "cpu", need_tokenizer=False).tokenizer_or_none is None


@pytest.mark.slow
def test_samples_are_recorded_by_the_run_layer_with_how_they_were_drawn(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "trained", run)
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "4",
                             "--top-p", "0.9", "--device", "cpu")
    assert code == 0, err
    header, text = (run / "samples.txt").read_text().split("\n", 1)
    assert header == "--- checkpoint best (step 10), seed 4, temperature 0.8, top_k None, top_p 0.9, prompt 'ROMEO:'"
    assert text.strip() == out.strip()


@pytest.mark.slow
def test_damaged_lines_of_metrics_jsonl_are_skipped_with_one_note_by_every_reader(tmp_path, stable_root, monkeypatch,
                                                                                  capsys):
    """One byte that is not UTF-8 or one JSON line that is not an object is skipped with one note by `log`, `runs`,
    `report`, `compare` and `train --resume`: never a traceback, and `runs` lists every run."""
    monkeypatch.chdir(stable_root)  # the dataset the legacy run names, for its resume
    runs = tmp_path / "runs"
    run, intact = runs / "damaged", runs / "intact"
    shutil.copytree(LEGACY / "trained", intact)
    shutil.copytree(LEGACY / "trained", run)
    first, *rest = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damage = [b"\xff\xfe not UTF-8\n", b"[1, 2]\n", b"null\n", b'{"event": "eval", "step": "ten"}\n']
    (run / "metrics.jsonl").write_bytes(b"".join([first, *damage, *rest, b'{"event": "tra']))  # and a cut last line
    note = (f"note: {run / 'metrics.jsonl'}: lines 2 (not JSON in UTF-8), 3 (not an object with an event name), "
            "4 (not an object with an event name) and 5 (an eval event whose step is not an integer) are not events "
            "of metrics.jsonl's schema and skipped; the run reads as if they were not there.")

    def lmlab_here(*args) -> tuple[str, str]:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 0
        return capsys.readouterr()

    out, err = lmlab_here("runs", runs, "--json")
    assert err.splitlines() == [note]  # said once in a process, however often the run is read
    assert {r["run"]: r["best_val_loss"] for r in json.loads(out)["runs"]} == \
        {"damaged": summarize(intact).best_val_loss, "intact": summarize(intact).best_val_loss}
    assert "val" in lmlab_here("log", run)[0]
    assert "damaged" in lmlab_here("compare", intact, run)[0]
    lmlab_here("report", run, "--no-eval", "--out", tmp_path / "report", "--max-new-tokens", "4")
    lmlab_here("train", "--resume", run, "--set", "train.max_iters=12", "--device", "cpu")
    assert [e["step"] for e in RunDir(run).events() if e["event"] == "eval"] == [5, 10, 12]
    assert b"\xff" not in (run / "metrics.jsonl").read_bytes()  # the resume's rewrite keeps whole events only


# Lines no reader can use, each with the reason its note gives: bracket bombs (json's parser recursed into a
# RecursionError), lines past any event's length, events missing a field or holding one of the wrong type.
BAD_LINES = [
    (b"[" * 200_000 + b"]" * 200_000, "nested deeper than 32 levels"),
    (b'{"event": "x", "a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32 levels"),
    (b'{"event": "x", "pad": "' + b"y" * (1 << 20) + b'"}', "longer than 1,048,576 bytes"),
    (b'{"event": "x", "step": 1' + b"0" * 5000 + b"}", "not JSON in UTF-8"),  # past Python's 4,300 digits
    (b'{"event": "eval", "step": 50}', "an eval event without val_loss"),
    ((b'{"event": "eval", "step": 50, "tokens": 1, "elapsed": 1, "train_loss": 1, "best_val_loss": 1, "is_best": '
      b'true}'), "an eval event without val_loss"),
    (b'{"event": "eval", "step": 50, "val_loss": 1, "is_best": "yes"}', "an eval event whose is_best is not a boolean"),
    ((b'{"event": "eval", "step": 50, "tokens": 1, "elapsed": 1, "train_loss": 1, "val_loss": "low", '
      b'"best_val_loss": 1, "is_best": true}'), "an eval event whose val_loss is not a number"),
    (b'{"event": "train", "step": 51, "tokens": 1, "elapsed": 1, "loss": true, "lr": 1}',
     "a train event whose loss is not a number"),
    (b'{"event": "checkpoint", "step": 52, "best": 1}', "a checkpoint event whose best is not a boolean"),
    (b'{"event": "start", "step": 0, "machine": [1]}', "a start event whose machine is not an object or null"),
    (b'{"event": "sizing", "candidates": 5}', "a sizing event whose candidates is not a list"),
    (b'{"event": "end", "step": 60, "tokens": 1, "elapsed": 1, "stopped_early": false, "stopped_by": 5}',
     "an end event whose stopped_by is not a string or null"),
    # Numbers lmlab never writes (it writes standard JSON, a non-finite figure as null): a step of 10^400 parsed and
    # overflowed the report's plot; NaN and 1e400 (inf) are no JSON at all.
    (b'{"event": "eval", "step": 1' + b"0" * 400 + b', "val_loss": 1}', "an eval event whose step is 1000000"),
    (b'{"event": "eval", "step": 53, "val_loss": NaN}', "an eval event whose val_loss is nan, past any figure"),
    (b'{"event": "train", "step": 54, "loss": 1e400, "lr": 1}', "a train event whose loss is inf, past any figure"),
]


@pytest.mark.slow
def test_every_reader_reads_events_against_their_schema_and_skips_the_rest_with_one_note(tmp_path, capsys):
    """A line of 200,000 brackets, or an eval without val_loss, is skipped with one note by `log`, `compare`, `plan`,
    `report` and `runs`: never a RecursionError or a KeyError, and the other runs still listed and planned."""
    runs = tmp_path / "runs"
    run, intact = runs / "damaged", runs / "intact"
    shutil.copytree(LEGACY / "trained", intact)
    shutil.copytree(LEGACY / "trained", run)
    first, *rest = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join([first, *(line + b"\n" for line, _ in BAD_LINES), *rest]))
    reasons = [f"{n} ({why})" for n, (_, why) in enumerate(BAD_LINES[:5], 2)]
    note = (f"note: {run / 'metrics.jsonl'}: lines {', '.join(reasons)} and {len(BAD_LINES) - 5} more are not events "
            "of metrics.jsonl's schema and skipped; the run reads as if they were not there.")
    assert RunDir(run).events() == RunDir(intact).events()
    assert capsys.readouterr().err.splitlines() == [note]

    def lmlab_here(*args) -> str:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 0
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return out

    listed = json.loads(lmlab_here("runs", runs, "--json"))["runs"]
    assert [r["run"] for r in listed] == ["damaged", "intact"]
    assert listed[0]["best_val_loss"] == listed[1]["best_val_loss"]
    logs = [json.loads(lmlab_here("log", r, "--json"))["evaluations"] for r in (run, intact)]
    assert logs[0] == logs[1]
    assert "damaged" in lmlab_here("compare", intact, run)
    assert "tokens" in lmlab_here("plan", intact, "--runs", runs, "--tokens-per-sec", "1000")
    lmlab_here("report", run, "--no-eval", "--out", tmp_path / "report", "--max-new-tokens", "4")


STRICT = {"parse_constant": lambda name: pytest.fail(f"metrics.jsonl holds {name}, which is not JSON")}


@pytest.mark.slow
def test_metrics_are_standard_json_a_non_finite_figure_is_null(tmp_path, tiny_run):
    """A run stopped before its first evaluation ends with no best val loss: `null`, where Python's json wrote
    `Infinity`, which jq, JavaScript and pandas refuse."""
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset), max_iters=100_000)
    proc = spawn("train", config, "--run", tmp_path / "run", "--set", "train.eval_interval=100000", "--device", "cpu",
                 cwd=tmp_path)
    wait_until(lambda: any(e["event"] == "train" for e in RunDir(tmp_path / "run").events()), proc)  # in its loop
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    end = json.loads(lines[-1], **STRICT)
    assert end["event"] == "end" and end["stopped_by"] == "SIGTERM" and end["best_val_loss"] is None
    assert all(json.loads(line, **STRICT) for line in lines)
    assert main(["runs", str(tmp_path)]) == 0  # its readers take it
