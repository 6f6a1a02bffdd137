"""What follows a step: a train line, a checkpoint, an evaluation by steps or by passes (never drifting from the
passes it stands for), and an evaluation at the last step; evaluation and patience by epoch, with the table of every
evaluation."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from lmlab.commands.common import console
from lmlab.core.config import TrainConfig
from lmlab.run.rundir import RunDir
from lmlab.train.cadence import Cadence
from tests.helpers import events_of, run_cli, write_config, write_corpus


def test_evaluations_by_steps_and_at_the_last_step():
    cadence = Cadence(TrainConfig(log_interval=5, eval_interval=20, checkpoint_interval=30), 20, 100, 10_000)
    due = [(s, cadence.after(s, 100 * s, 70)) for s in range(1, 71)]
    assert [s for s, d in due if d.evaluate] == [20, 40, 60, 70]
    assert [s for s, d in due if d.save] == [30, 60] and [s for s, d in due if d.log] == list(range(5, 71, 5))
    assert not cadence.after(1, 100, 70)


def test_evaluations_by_passes_come_at_the_first_step_past_each():
    train = TrainConfig(eval_interval="0.5 epochs")
    split, per_step = 1_000, 128  # 7.8 steps a pass: rounding the steps would drift from the passes
    cadence = Cadence(train, train.eval_steps(split, per_step), per_step, split)
    evaluated = [s for s in range(1, 40) if cadence.after(s, s * per_step, 10**6).evaluate]
    assert evaluated == [math.ceil(k * split / 2 / per_step) for k in range(1, len(evaluated) + 1)]
    assert cadence.intervals == (4, train.checkpoint_interval)  # the steps nearest half a pass, as budgets plan


@pytest.mark.slow
def test_evaluation_and_patience_by_epoch_with_the_time_per_epoch_and_the_table_of_every_evaluation(tmp_path, capsys,
                                                                                                     monkeypatch):
    """The WikiText-2 notes: an evaluation per epoch, stopped after 2 epochs without a new best; then the log as the
    write-ups print it, in 80 columns, as CSV and JSON, and in the report."""
    code, _, err = run_cli(capsys, "prepare", write_corpus(tmp_path / "corpus", n_docs=3, speeches=12),
                           "--tokenizer", "char", "--out-dir", tmp_path / "data")
    dataset = next((tmp_path / "data").iterdir())
    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=10_000)
    # A learning rate too small to move the weights: no evaluation after the first is a new best.
    code, out, err = run_cli(capsys, "train", config, "--run", tmp_path / "run", "--device", "cpu",
                             "--set", "train.eval_every=epoch", "--set", "train.patience=2", "--set",
                             "train.learning_rate=1e-30", "--set", "train.min_lr=0", "--set", "train.batch_size=4")
    assert code == 0, err
    run = tmp_path / "run"
    evals, end = events_of(run, "eval"), events_of(run, "end")[-1]
    assert RunDir(run).config().train.eval_interval == "epoch"  # the spacing as given
    steps_per_epoch = RunDir(run).config().train.eval_steps(json.loads((dataset / "meta.json").read_text())["train"][
        "tokens"], 4 * 32)
    split = json.loads((dataset / "meta.json").read_text())["train"]["tokens"]
    assert steps_per_epoch == round(split / (4 * 32))  # the steps nearest one pass of batch 4 x 32 tokens
    # Each at the first step past a pass: never drifting from it, whatever the rounding of the steps per epoch.
    assert [e["step"] for e in evals] == [math.ceil(k * split / (4 * 32)) for k in (1, 2, 3)]
    assert all(k <= e["epoch"] < k + 4 * 32 / split + 1e-4 for e, k in zip(evals, (1, 2, 3)))
    assert end["stopped_early"] and "no new best val loss in 2 epochs" in out
    assert "epoch 1.0" in out and "/epoch" in out  # an evaluation named by its epoch; the train line's time per epoch
    code, out, _ = run_cli(capsys, "compare", run, run, "--json")
    row = json.loads(out)["runs"][0]
    assert row["epoch_seconds"] == pytest.approx(row["elapsed"] / row["epochs"])

    monkeypatch.setattr(console, "width", 80)  # a terminal of 80 columns
    code, table, _ = run_cli(capsys, "log", run)
    lines = table.splitlines()
    assert code == 0 and max(map(len, lines)) <= 80, table
    assert [line.split()[0] for line in lines if line.split() and line.split()[0].replace(",", "").isdigit()] == \
        [f"{e['step']:,}" for e in evals]
    assert "* " + f"{evals[0]['val_loss']:.4f}" in table  # the first evaluation, the only best
    code, out, _ = run_cli(capsys, "log", run, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["val_loss"]) for r in rows] == [e["val_loss"] for e in evals]
    assert [r["train_eval_loss"] for r in rows] == [str(e["train_eval_loss"]) for e in evals]
    code, out, _ = run_cli(capsys, "log", run, "--json")
    assert [e["best_val_loss"] for e in json.loads(out)["evaluations"]] == [e["best_val_loss"] for e in evals]
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "report", "--no-eval", "--max-new-tokens", "4",
                           "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "every evaluation of run (3)" in report, err
    assert "stopped early at step" in report and "no new best in 2 epochs" in report
