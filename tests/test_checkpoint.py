"""Checkpoints a two-day run can trust: exact resume after kill -9, verified files, graceful stop, guards, and
a disk margin of the checkpoint's own size."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from lmlab.commands import main
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.model.gpt import GPT
from lmlab.run import checkpoint as ckpt
from lmlab.run.checkpoint import checkpoint_bytes, load_checkpoint, model_tensors, save_checkpoint
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.step import TrainStep
from tests.helpers import (
    LMLAB,
    a_machine,
    copy_run,
    kill_and_resume,
    same_weights,
    stable_events,
    wait_for,
    weights,
    write_config,
)


def trainer(tmp_path: Path, dataset: Path, overrides=(), run="run", **kw) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset), list(overrides))
    return Trainer(train_job(cfg, tmp_path / run, "cpu", **kw))


@pytest.mark.slow
def test_kill_9_at_arbitrary_points_then_resume_is_bitwise_identical(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=120)
    # one thread in every process: results differ in their last bits between thread counts (lmlab.core.threads)
    settings = ["--set", "train.checkpoint_interval=7", "--set", "train.log_interval=3", "--set", "model.dropout=0.1",
                "--set", "train.threads=1"]
    subprocess.run([LMLAB, "train", config, "--run", tmp_path / "straight", *settings], check=True,
                   capture_output=True, timeout=300)

    run = tmp_path / "killed"
    # Metrics lines: lands mid-interval, between checkpoints.
    kill_and_resume([LMLAB, "train", config, "--run", run, *settings], run, (9, 31, 58))

    same_weights(tmp_path / "straight", run)
    assert stable_events(run) == stable_events(tmp_path / "straight")
    assert any(e["event"] == "resume" for e in RunDir(run).events())


def test_a_run_killed_after_its_last_checkpoint_or_after_it_ended_resumes_to_the_same_log(tmp_path, char_dataset):
    """A kill between the last checkpoint and the end leaves the run's folders as a finished run has them and its
    log cut anywhere after that checkpoint's event: each such cut, and the whole log (a finished run resumed
    again), resumed, logs what the run never killed logged: the final score once, no checkpoint saved again, and
    the end's lr the schedule's."""
    quiet = Console(quiet=True)
    straight = trainer(tmp_path, char_dataset, ["train.max_iters=14", "train.checkpoint_interval=7",
                                                "train.eval_interval=25"], run="straight", console=quiet).run().run_dir
    lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == "checkpoint")
    assert [json.loads(line)["event"] for line in lines[last:]] == ["checkpoint", "final", "end"]
    for cut in range(last + 1, len(lines) + 1):
        run = tmp_path / f"cut{cut}"
        shutil.copytree(straight, run)
        (run / "metrics.jsonl").write_text("".join(lines[:cut]))
        Trainer(train_job(load_config(run / "config.toml"), run, "cpu", resume=True, console=quiet)).run()
        assert stable_events(run) == stable_events(straight), cut
        assert RunDir(run).step_folders() == [run / "checkpoints" / "step_000007", run / "checkpoints" / "step_000014"]


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=100_000)
    run = tmp_path / "run"
    proc = subprocess.Popen([LMLAB, "train", config, "--run", run, "--set", "train.checkpoint_interval=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(RunDir(run).events()) >= 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"lmlab train --resume {run}" in out.replace("\n", "")
    end = RunDir(run).events()[-1]
    assert end["event"] == "end" and end["stopped_by"] == "SIGTERM"
    assert RunDir(run).checkpoint("latest").name == f"step_{end['step']:06d}"


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_named_and_resume_falls_back(tmp_path, char_dataset, capsys):
    trainer(tmp_path, char_dataset, ["train.max_iters=30", "train.eval_interval=100"]).run()
    run = tmp_path / "run"
    latest = RunDir(run).checkpoint("latest")
    assert latest.name == "step_000030"
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn write
    (run / "checkpoints" / ".step_000040.tmp-999").mkdir()  # a crash during a checkpoint write
    code = main(["train", "--resume", str(run), "--set", "train.max_iters=40", "--device", "cpu"])
    out = capsys.readouterr().out.replace("\n", "")
    assert code == 0
    assert "step_000030/model.safetensors is truncated or corrupt" in out
    assert "Resumed" in out and "from step_000020" in out
    assert RunDir(run).checkpoint("latest").name == "step_000040"
    assert not list((run / "checkpoints").glob(".step_*"))


@pytest.mark.slow
def test_a_checkpoint_says_how_long_it_took_to_write_and_a_resume_how_long_its_load_took(tmp_path, char_dataset,
                                                                                          capsys):
    """Save and load times were only a benchmark's (bench --checkpoint); a run says its own."""
    trainer(tmp_path, char_dataset, ["train.max_iters=20"]).run()
    run = tmp_path / "run"
    saves = [e for e in RunDir(run).events() if e["event"] == "checkpoint"]
    assert [e["step"] for e in saves] == [10, 20]
    assert all(isinstance(e["seconds"], float) and e["seconds"] >= 0 for e in saves)
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=30", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(rf"Resumed {re.escape(str(run))} from step_000020 \(step 20\) in \d+\.\d\d s; from here "
                     r"train\.max_iters 20 -> 30\.", out), out


@pytest.mark.slow
def test_only_the_last_k_checkpoints_and_best_are_kept(tmp_path, char_dataset):
    trainer(tmp_path, char_dataset, ["train.max_iters=60", "train.keep_checkpoints=2",
                                     "train.learning_rate=1e-30", "train.min_lr=0", "train.warmup_iters=0"]).run()
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    best = RunDir(run).checkpoint("best").name
    assert kept == sorted({best, "step_000050", "step_000060"})


@pytest.mark.slow
def test_resume_refuses_another_model_shape_and_changed_data_without_force(tmp_path, char_dataset, corpus_dir):
    trainer(tmp_path, char_dataset, ["train.max_iters=10"]).run()
    run = tmp_path / "run"
    cfg = load_config(run / "config.toml", ["model.n_layer=3"])
    with pytest.raises(UserError, match=r"another model shape \(n_layer 2 -> 3\)"):
        Trainer(train_job(cfg, run, "cpu", resume=True))
    from lmlab.data.prepare import prepare
    other, _, _ = prepare([str(corpus_dir)], "char", name="other", out_dir=tmp_path, val_fraction=0.3)
    cfg = load_config(run / "config.toml", [f"data.dataset={other}", "train.max_iters=20"])
    with pytest.raises(UserError, match="--force"):
        Trainer(train_job(cfg, run, "cpu", resume=True))
    assert Trainer(train_job(cfg, run, "cpu", resume=True, force=True)).run().steps == 20


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_old_weights(tmp_path, char_dataset):
    old = trainer(tmp_path, char_dataset, ["train.max_iters=60"], run="old").run()
    new = trainer(tmp_path, char_dataset, ["train.max_iters=10", "train.warmup_iters=10"], run="new",
                  init_from=f"{tmp_path / 'old'}:best").run()
    first_eval = next(e for e in RunDir(new.run_dir).events() if e["event"] == "eval")
    assert first_eval["step"] == 10
    assert first_eval["val_loss"] < old.best_val_loss + 0.1  # far below a fresh model's loss
    with pytest.raises(UserError, match="model shape"):
        trainer(tmp_path, char_dataset, ["model.n_embd=64"], run="wide", init_from=str(tmp_path / "old"))


@pytest.mark.parametrize("spec, folder, label", [("", "step_000020", "latest, step 20"),
                                                 (":best", "step_000020", "best, step 20"),
                                                 (":10", "step_000010", "step 10"),
                                                 (":step_10", "step_000010", "step 10")])
def test_init_from_says_the_run_and_checkpoint_it_starts_from(trained, tmp_path, capsys, spec, folder, label):
    """--init-from takes best, latest, step_N or N, as its help says, and a line names the run, the step folder and
    what was carried; the run's weights are that folder's."""
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(trained).config().data.dataset), max_iters=1)
    new = tmp_path / "new"
    assert main(["train", str(config), "--run", str(new), "--init-from", f"{trained}{spec}", "--set",
                 "train.learning_rate=1e-9", "--set", "train.min_lr=1e-9"]) == 0
    assert f"starting from {trained}, checkpoint {folder} ({label}): its weights (a new optimizer)" in \
        capsys.readouterr().out
    started, kept = weights(new, "step_000001"), weights(trained, folder)
    assert all(torch.allclose(started[name], kept[name], atol=1e-4) for name in kept)


@pytest.mark.slow
def test_poisoned_batches_are_flagged_then_rolled_back_and_nan_never_reaches_the_weights(tmp_path, char_dataset):
    t = trainer(tmp_path, char_dataset, ["train.max_iters=90"])
    counts = np.bincount(t.job.splits["train"], minlength=t.cfg.model.vocab_size)
    rarest = int(np.where(counts > 0, counts, counts.max() + 1).argmin())
    clean_next, clean_forward = t.job.loader.next, t.job.step.forward
    batches = []

    def poisoned_next():
        x, y = clean_next()
        batches.append(len(batches) + 1)
        if batches[-1] in (71, 72, 73):  # three garbage batches in a row, at a data position:
            y = torch.full_like(y, rarest)  # every target the corpus's rarest token
        return x, y

    def nan_forward(x, y):
        logits, loss = clean_forward(x, y)
        return logits, loss * float("nan") if t.progress.step == 40 else loss

    t.job.loader.next, t.job.step.forward = poisoned_next, nan_forward
    result = t.run()
    events = RunDir(result.run_dir).events()
    kinds = [(e["event"], e["step"]) for e in events if e["event"] in ("skip", "spike", "rollback")]
    assert kinds == [("skip", 41), ("spike", 71), ("spike", 72), ("rollback", 73)]
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["to_step"] == 70 and rollback["lr_scale"] == 0.5
    assert result.steps == 90
    assert all(torch.isfinite(w).all() for w in weights(result.run_dir).values())
    late = [e for e in events if e["event"] == "train" and e["step"] > 70]
    assert all(e["lr"] <= 0.5 * 3e-3 for e in late)


@pytest.mark.slow
def test_a_bf16_checkpoint_continues_in_fp32_and_back(tmp_path, char_dataset):
    """The CPU stand-in for CUDA<->CPU portability: weights and optimizer state are fp32 whatever the
    autocast dtype, so a run continues under another precision (and, the same way, on another device)."""
    trainer(tmp_path, char_dataset, ["train.max_iters=20", "train.dtype=bfloat16"]).run()
    run = tmp_path / "run"
    assert all(t.dtype == torch.float32 for t in weights(run).values())
    for dtype, steps in (("float32", 30), ("bfloat16", 40)):
        cfg = load_config(run / "config.toml", [f"train.dtype={dtype}", f"train.max_iters={steps}"])
        result = Trainer(train_job(cfg, run, "cpu", resume=True)).run()
        assert result.steps == steps
    evals = [e["val_loss"] for e in RunDir(run).events() if e["event"] == "eval"]
    assert len(evals) == 4 and evals[-1] < evals[0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_loads_into_the_tensors_training_holds_without_a_second_copy(tmp_path, optimizer):
    """A rollback mid-run: the weights and optimizer state come back into the very tensors training allocated (on a
    GPU, nothing more on its device than before); a fresh optimizer, as at a resume, gets its state made once."""
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    torch.manual_seed(0)
    model = GPT(config)
    step = TrainStep(model, TrainConfig(optimizer=optimizer, compile=False), a_machine())
    x = torch.randint(0, 20, (2, 8))
    step([(x, x)], 1, 1e-2)
    folder = save_checkpoint(tmp_path, 1, model_tensors(model), step.optimizer.state_dict(), {}, best=False)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                   for i, s in step.optimizer.state_dict()["state"].items()}
    step([(x, x)], 1, 1e-2)  # training moves on from it
    held = _addresses(model, step.optimizer)
    load_checkpoint(folder, model, step.optimizer)
    assert _addresses(model, step.optimizer) == held
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    for i, entries in step.optimizer.state_dict()["state"].items():
        assert all(torch.equal(entries[k], v) for k, v in saved_state[i].items())
    fresh = TrainStep(model, TrainConfig(optimizer=optimizer, compile=False), a_machine())
    load_checkpoint(folder, model, fresh.optimizer)  # a resume: no state yet, made from the file
    for i, entries in fresh.optimizer.state_dict()["state"].items():
        assert all(torch.equal(entries[k], v) for k, v in saved_state[i].items())


def _addresses(model, optimizer) -> dict:
    """Where each weight and each tensor of the optimizer's state lives."""
    return {**{name: t.data_ptr() for name, t in model.state_dict().items()},
            **{(i, k): v.data_ptr() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}}


class Killed(BaseException):
    """What a kill -9 does to a write, here: nothing after it runs."""


def test_a_kill_anywhere_in_a_checkpoints_write_leaves_latest_the_newest_whole_checkpoint(tmp_path, tiny_run,
                                                                                            monkeypatch):
    """At every rename and fsync of a checkpoint's write a kill leaves `latest` the newest whole step folder, the
    one a resume goes on from: killed between the folder's rename and its pointer, `latest` named the one before,
    and the resume trained again the steps the newer one held."""
    run = copy_run(tiny_run, tmp_path)
    root, before = RunDir(run).checkpoints, RunDir(run).checkpoint("latest")
    weights = {name: torch.zeros(2) for name in ("a", "b")}
    real_replace, real_fsync = os.replace, ckpt.fsync
    for kill_at in itertools.count(1):
        calls = itertools.count(1)

        def counted(real, kill_at=kill_at, calls=calls):
            def call(*args, **kwargs):
                if next(calls) == kill_at:
                    raise Killed
                return real(*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", counted(real_replace))
            patch.setattr(ckpt, "fsync", counted(real_fsync))
            try:
                save_checkpoint(root, 99, weights, {"state": {}, "param_groups": []}, {}, best=False)
            except Killed:
                ckpt.remove_partial(root)  # what a resume does first
                whole = RunDir(run).step_folders()
                assert whole[-1] in (before, root / "step_000099") and RunDir(run).checkpoint("latest") == whole[-1]
                continue
        break
    assert kill_at > 4 and RunDir(run).checkpoint("latest") == root / "step_000099"


def test_a_checkpoints_disk_margin_is_its_own_size_not_a_fixed_16_mib(tiny_run):
    folder = RunDir(tiny_run).checkpoint("latest")
    from safetensors.torch import load_file

    tensors = [*load_file(folder / "model.safetensors").values(), *load_file(folder / "optimizer.safetensors").values()]
    state = json.loads((folder / "state.json").read_text())
    state.pop("files")
    need = checkpoint_bytes(tensors, state)
    on_disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    assert on_disk <= need < on_disk + 64 * 1024
