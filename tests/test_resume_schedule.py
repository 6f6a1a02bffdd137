"""A run resumed with another length says what happens to its schedule and goes on from the LR it had, decaying to
min_lr at the new end; the checkpoint it resumed from, and the best, outlive retention, and a resume that will
delete step folders names them."""

from __future__ import annotations

import re

import pytest

from lmlab.commands import main
from lmlab.core.config import TrainConfig, load_config
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.schedule import lr_at, lr_at_position, position_of
from tests.helpers import write_config

MIN_LR = 3e-4  # tests/helpers.py's tiny config


def lrs(run) -> dict[int, float]:
    """The LR of each logged step (a line's last step)."""
    return {e["step"]: e["lr"] for e in RunDir(run).events() if e["event"] == "train"}


def said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_position_of_an_lr_is_where_the_schedule_has_it(schedule):
    cfg = TrainConfig(schedule=schedule, learning_rate=1e-3, min_lr=1e-4)
    for position in (0.81, 0.9, 1.0) if schedule == "wsd" else (0.0, 0.25, 0.5, 0.99, 1.0):
        assert position_of(lr_at_position(position, cfg), cfg) == pytest.approx(position, abs=1e-9)
    assert position_of(cfg.learning_rate, cfg) == 0.0  # the peak: wsd's stable stretch goes on from its start
    assert position_of(1.0, cfg) == 0.0 and position_of(0.0, cfg) == 1.0  # clipped to the schedule


def test_a_resume_still_warming_up_says_the_warmup_it_has_left(tmp_path, char_dataset, capsys):
    """`schedule kept from step 40: lr 2.4e-04 -> 3.0e-05` hid the warmup still to run."""
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=3), tmp_path / "run"
    assert main(["train", str(config), "--run", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=20"]) == 0
    assert ("schedule kept from step 3: lr 2.0e-03, rising to 3.0e-03 by step 5 (warmup), then -> 3.0e-04 at step "
            "20") in said(capsys)


def test_extending_a_run_goes_on_from_its_lr_and_decays_at_the_new_end(tmp_path, char_dataset, capsys):
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=40), tmp_path / "run"
    # to step 40 of a cosine laid over 100 steps: the LR there is mid-decay
    assert main(["train", str(config), "--run", str(run), "--device", "cpu", "--set", "train.log_interval=1",
                 "--set", "train.lr_decay_iters=100"]) == 0
    over_100 = TrainConfig(max_iters=100, learning_rate=3e-3, min_lr=MIN_LR, warmup_iters=5)
    capsys.readouterr()
    # max_iters alone: the schedule's end (lr_decay_iters) stands, and the line says so
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=60", "--set", "train.log_interval=1"]) == 0
    assert f"schedule kept from step 40: lr {lr_at(40, over_100):.1e} -> {MIN_LR:.1e} at step 100" in said(capsys)
    # then the end moves to 90: laid anew from the LR of step 60 (no warmup again), min_lr at 90
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=90", "--set", "train.lr_decay_iters=0",
                 "--set", "train.log_interval=1"]) == 0
    line = re.search(r"schedule re-laid from step 60: lr ([\d.e+-]+) -> 3\.0e-04 at step 90", said(capsys))
    steps = lrs(run)  # a line's LR is its last step's: line 61 is step index 60
    assert line and float(line[1]) == pytest.approx(lr_at(60, over_100), rel=0.05)
    assert steps[61] == pytest.approx(lr_at(60, over_100)) and steps[90] == pytest.approx(MIN_LR)
    assert all(steps[s + 1] <= steps[s] + 1e-12 for s in range(40, 90))  # continuous and falling throughout
    # a resume of the same length keeps it: nothing said, nothing changed
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=90", "--set", "train.lr_decay_iters=0",
                 "--set", "train.log_interval=1"]) == 0
    assert "schedule" not in said(capsys) and lrs(run) == steps


def test_a_budgeted_run_extended_by_steps_keeps_its_lr(tmp_path, char_dataset, capsys):
    """training.md's recipe: `--set train.budget_seconds=0 --set train.max_iters=N` on a budgeted run."""
    run = tmp_path / "run"
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset), [
        "train.budget_seconds=3", "train.log_interval=1", "train.warmup_iters=0", "train.min_lr=1e-5",
        "train.eval_interval=50"])
    end = Trainer(cfg, run, "cpu").run().steps  # the budget counts from run(): the test's process is old
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.budget_seconds=0", "--set",
                 f"train.max_iters={end + 10}", "--set", "train.log_interval=1"]) == 0
    assert re.search(rf"schedule re-laid from step {end}: lr [\d.e+-]+ -> 1\.0e-05 at step {end + 10}", said(capsys))
    steps = lrs(run)
    assert all(steps[s + 1] <= steps[s] + 1e-12 for s in range(end - 1, end + 10))  # no jump back up at the resume


def test_retention_keeps_the_step_resumed_from_and_says_what_it_deletes(tmp_path, char_dataset, capsys):
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=30), tmp_path / "run"
    every = ["--set", "train.checkpoint_interval=5", "--set", "train.eval_interval=100"]
    assert main(["train", str(config), "--run", str(run), "--device", "cpu", *every]) == 0
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000020", "step_000025", "step_000030"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=50", *every]) == 0
    assert ("note: with train.keep_checkpoints = 3, the checkpoints to come delete step_000020, step_000025; "
            "step_000030 (resumed from and best) stay") in said(capsys)
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000030", "step_000040", "step_000045",
                                                            "step_000050"]
    assert main(["sample", str(run), "--checkpoint", "30", "--max-new-tokens", "5"]) == 0  # the write-up's sample
    capsys.readouterr()
    # resumed twice: both steps it went on from stay, and best (one of them, or the end)
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=70", *every]) == 0
    assert re.search(r"delete step_000040, step_000045; step_000030 \(resumed from( and best)?\), step_000050 "
                     r"\(resumed from( and best)?\) stay", said(capsys))
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000030", "step_000050", "step_000060",
                                                            "step_000065", "step_000070"]


def test_the_loss_plot_marks_where_a_run_was_resumed(tmp_path, char_dataset):
    """A dashed line at the step resumed from, the full height of the axes: a resume that changed the machine,
    the threads or the schedule shows where the curve changes."""
    from matplotlib.image import imread

    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20), tmp_path / "run"
    assert main(["train", str(config), "--run", str(run), "--device", "cpu"]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=40"]) == 0
    resumed = imread(run / "loss.png")
    # The same run's plot without its resume event: what differs is the line (and its legend entry)
    (run / "metrics.jsonl").write_text("".join(line for line in (run / "metrics.jsonl").open()
                                               if '"event": "resume"' not in line))
    from lmlab.analysis.plots import plot_losses

    plain = imread(plot_losses(RunDir(run), tmp_path / "plain.png"))
    differs = (abs(resumed - plain).sum(axis=2) > 0.1)
    tall = differs.sum(axis=0)  # per column of pixels
    assert tall.max() > 0.5 * differs.shape[0] and (tall > 0.5 * differs.shape[0]).sum() <= 4  # one thin line
