"""`lmlab sweep`: the grid and its budgets in-process (fast); an interrupted sweep continued in real processes
(slow)."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from lmlab.analysis.runs import summarize
from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.experiments.sweep import plan_trials
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import LMLAB, write_config


def test_the_grid_is_the_cartesian_product_under_one_token_budget(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    trials = plan_trials(config, ["train.learning_rate=1e-3,3e-3", "train.batch_size=4,8", "model.n_layer=1"],
                         tmp_path / "sweep", budget_tokens=8 * 32 * 10)
    assert [t.name for t in trials] == ["learning_rate=1e-3,batch_size=4", "learning_rate=1e-3,batch_size=8",
                                        "learning_rate=3e-3,batch_size=4", "learning_rate=3e-3,batch_size=8"]
    assert [t.config.train.max_iters for t in trials] == [20, 10, 20, 10]  # equal tokens: 2560 each
    assert all(t.config.model.n_layer == 1 for t in trials)
    seconds = plan_trials(config, ["train.learning_rate=1e-3,3e-3"], tmp_path / "s", budget_seconds=30)
    assert [t.config.train.budget_seconds for t in seconds] == [30.0, 30.0]
    with pytest.raises(UserError, match="model.n_layer must be int"):
        plan_trials(config, ["model.n_layer=2,two"], tmp_path / "s")


@pytest.mark.slow
def test_an_interrupted_sweep_skips_its_finished_trials(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    # The transformer against the recurrent model: the second trial also runs the recurrent one end to end.
    command = [LMLAB, "sweep", config, "--set", "model.kind=gpt,recurrent", "--set", "model.n_layer=1",
               "--budget-tokens", str(8 * 32 * 20), "--name", "arch", "--dir", tmp_path / "runs", "--device", "cpu"]
    first, second = (tmp_path / "runs" / "arch" / f"kind={kind}" for kind in ("gpt", "recurrent"))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while summarize(first).status != "finished" and proc.poll() is None:
        assert time.monotonic() < deadline, "the first trial did not finish"
        time.sleep(0.05)
    proc.kill()  # mid-way through the second trial (or just before it starts)
    proc.wait()
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stdout
    assert "kind=gpt: already finished, skipped" in out
    assert summarize(first).steps == 20 and summarize(second).status == "finished"
    assert summarize(second).steps == 20 and summarize(second).tokens == 8 * 32 * 20
    assert "Compared with kind=gpt" in out and "best setting: kind=" in out


@pytest.mark.slow
def test_a_wall_clock_budget_ends_the_run_with_an_eval_and_a_checkpoint(tmp_path, char_dataset):
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=1_000_000),
                      ["train.max_seconds=8.0", "train.eval_interval=100000"])  # its start-up fits on a busy host
    result = Trainer(train_job(cfg, tmp_path / "run", "cpu")).run()
    events = RunDir(result.run_dir).events()
    assert 0 < result.steps < 1_000_000 and result.stopped_by is None
    assert [e["step"] for e in events if e["event"] == "eval"] == [result.steps]
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{result.steps:06d}"
    assert summarize(result.run_dir).status == "finished"


def scored(run: Path, val: float, stderr: float, tokens: int | None = None) -> None:
    """The trial's final score (and the tokens it ended at) rewritten in its metrics.jsonl."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for e in events:
        if e["event"] == "final":
            e.update(val_loss=val, stderr=stderr)
        if e["event"] == "end" and tokens:
            e["tokens"] = tokens
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.mark.slow
def test_the_best_setting_says_the_spread_it_is_chosen_within(tmp_path, char_dataset, capsys):
    """A best setting within the noise of another is said to be (was: "best setting: learning_rate=4e-4 (4.8129 ±
    0.0250)" beside 8e-4's 4.8171 ± 0.0276, after 1.38x the tokens, nothing said); one past it says its margin and
    the noise; scores of the whole split have no sampling error, and say a seed's spread is not measured; trials of
    unequal tokens are said to be. The finished sweep run again says it from its trials' folders."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    argv = ["sweep", str(config), "--set", "train.learning_rate=4e-4,8e-4", "--budget-tokens", str(8 * 32 * 10),
            "--dir", str(tmp_path / "runs"), "--name", "lr", "--device", "cpu"]
    assert main(argv) == 0
    low, high = (tmp_path / "runs" / "lr" / f"learning_rate={lr}" for lr in ("4e-4", "8e-4"))
    tokens = summarize(low).tokens

    def said() -> str:
        capsys.readouterr()
        assert main(argv) == 0
        return " ".join(capsys.readouterr().out.split())

    scored(low, 4.8129, 0.0250)
    scored(high, 4.8171, 0.0276, round(1.38 * tokens))
    out = said()
    assert "best setting: learning_rate=4e-4 (final val 4.8129 ± 0.0250, run " in out
    assert ("within the noise of learning_rate=8e-4 (4.8171 ± 0.0276): 0.0042 apart, under twice the standard error "
            "of the difference (2 × 0.0372)") in out
    assert (f"unequal tokens: the trials trained {tokens / 1000:.3g}k (learning_rate=4e-4) to "
            f"{1.38 * tokens / 1000:.3g}k (learning_rate=8e-4, 1.38x)") in out
    scored(high, 4.9, 0.0276, tokens)
    out = said()
    assert ("0.0871 below the next, learning_rate=8e-4 (4.9000 ± 0.0276): past twice the standard error of the "
            "difference (2 × 0.0372)") in out and "within the noise" not in out and "unequal tokens" not in out
    scored(low, 4.8129, 0.0)
    scored(high, 4.8171, 0.0)
    assert ("0.0042 below learning_rate=8e-4 (4.8171), both on the whole val split: no sampling error, and how far a "
            "seed moves a score is not measured") in said()
