"""Listing, comparing and fitting runs from their directories; streaming metrics to TensorBoard."""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.commands import main
from lmlab.config import load_config
from lmlab.data.prepare import prepare
from lmlab.rundir import RunDir
from lmlab.runs import summarize
from lmlab.scaling import fit_power_law
from lmlab.train.loop import Trainer
from tests.conftest import LMLAB, write_config


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> list[Path]:
    """Three real trainings of different widths on the embedded Shakespeare corpus."""
    root = tmp_path_factory.mktemp("compare")
    dataset, _, _ = prepare(["shakespeare"], "char", out_dir=root / "data")
    runs = []
    for name, width, steps in (("small", 16, 20), ("medium", 32, 30), ("large", 48, 40)):
        config = load_config(write_config(root / "tiny.toml", dataset, max_iters=steps),
                             [f"model.n_embd={width}"])
        runs.append(Trainer(config, root / "runs" / name, "cpu").run().run_dir)
    return runs


def cells(out: str, label: str) -> list[str]:
    """The cells of one row of a rich table in the captured output."""
    line = next(line for line in out.splitlines() if line.startswith("│ " + label))
    return [c.strip() for c in line.strip("│").split("│")][1:]


def test_compare_table_ratios_match_the_metrics_files(three_runs, capsys, tmp_path):
    plot = tmp_path / "compare.png"
    assert main(["compare", *map(str, three_runs), "--plot", str(plot), "--x", "tokens", "--log"]) == 0
    out = capsys.readouterr().out
    starts = [RunDir(r).events()[0] for r in three_runs]
    ends = [RunDir(r).events()[-1] for r in three_runs]
    best = [min(e["val_loss"] for e in RunDir(r).events() if e["event"] == "eval") for r in three_runs]
    params = cells(out, "parameters")
    tokens = cells(out, "tokens seen")
    loss = cells(out, "best val loss")
    for i in range(3):
        assert params[i].endswith(f"({starts[i]['params'] / starts[0]['params']:.2f}×)")
        assert tokens[i] == f"{ends[i]['tokens']:,} ({ends[i]['tokens'] / ends[0]['tokens']:.2f}×)"
        assert loss[i] == f"{best[i]:.4f} ({100 * (best[i] / best[0] - 1):+.1f}%)"
    per_param = cells(out, "tokens per parameter")
    assert per_param[2] == f"{ends[2]['tokens'] / starts[2]['params']:.2f}"
    chinchilla = cells(out, "% of Chinchilla-optimal")
    assert chinchilla[1] == f"{100 * ends[1]['tokens'] / (20 * starts[1]['params']):.1f}%"
    bpb = cells(out, "bits per byte")
    assert all(float(v) > 0 for v in bpb)
    assert plot.stat().st_size > 20_000


def test_compare_samples_every_run_side_by_side(three_runs, capsys):
    assert main(["compare", *map(str, three_runs), "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "Samples, prompt 'ROMEO:'" in out
    assert len(re.findall(r"ROMEO:", out)) >= 3
    for run in three_runs:
        assert run.name in out


def test_scaling_fits_compute_and_parameters(three_runs, capsys, tmp_path):
    plot = tmp_path / "scaling.png"
    assert main(["scaling", *map(str, three_runs), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "compute (FLOPs)" in out and "parameters" in out and "predicted loss at 10×" in out
    assert plot.stat().st_size > 20_000


def test_a_power_law_is_recovered_exactly():
    x = [1e12, 1e13, 1e14, 1e15]
    fit = fit_power_law(x, [5.0 * v ** -0.1 for v in x], list("abcd"), "compute")
    assert fit.a == pytest.approx(5.0) and fit.b == pytest.approx(-0.1)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.r2 == pytest.approx(1.0)
    assert fit.predict(1e16) == pytest.approx(5.0 * 1e16 ** -0.1)


def test_runs_lists_finished_half_written_and_foreign_dirs(three_runs, capsys, tmp_path):
    root = three_runs[0].parent
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "config.toml").write_text("[model]\n")
    (root / "old").mkdir(exist_ok=True)
    (root / "old" / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"event": "eval", "step": 5, "val_loss": 2.5}\n{"trunc')
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert cells(out, "small")[0] == "finished"
    assert cells(out, "notes")[0] == "not a run"
    assert cells(out, "broken")[0] == "half-written"
    assert cells(out, "old")[0] == "crashed" and cells(out, "old")[7] == "2.5000"
    assert cells(out, "small")[1:3] == ["gpt 2L/16", f"{summarize(three_runs[0]).params / 1e6:.2f}M"]
    assert cells(out, "small")[4] == "char"


def test_tensorboard_receives_the_same_metrics(tmp_path, char_dataset):
    config = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20),
                         ["train.tracker=tensorboard"])
    run = Trainer(config, tmp_path / "tb", "cpu").run().run_dir
    events = EventAccumulator(str(run))
    events.Reload()
    logged = RunDir(run).events()
    train = [(e["step"], e["loss"]) for e in logged if e["event"] == "train"]
    val = [(e["step"], e["val_loss"]) for e in logged if e["event"] == "eval"]
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("train/loss")] == train
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("val/loss")] == val
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_sec"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_a_live_run_is_listed_as_running_with_a_current_plot(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=100_000)
    run = tmp_path / "runs" / "live"
    proc = subprocess.Popen([LMLAB, "train", config, "--run", run], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "loss.png").exists():  # drawn at the first eval, not only at the end
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert summarize(run).status == "running"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    stopped = summarize(run)
    assert stopped.status == "stopped (SIGTERM)"
    proc = subprocess.Popen([LMLAB, "train", "--resume", run], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while summarize(run).steps <= stopped.steps:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert summarize(run).status == "crashed"
