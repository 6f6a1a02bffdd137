"""`train.budget_seconds` / `lmlab train --budget`: the plan's arithmetic, a budgeted run laid over its plan, and
exact resume without timing anything again. No assertion here is on wall time: how close a run ends to its
budget on a machine is measured by benchmarks/cpu_speedrun.py."""

import shutil
import subprocess

import pytest
import torch

from lmlab.checkpoint import pointer
from lmlab.commands import main
from lmlab.config import load_config
from lmlab.errors import UserError
from lmlab.rundir import RunDir
from lmlab.train.budget import BudgetPlan, seconds_needed, steps_that_fit
from lmlab.train.loop import Trainer
from lmlab.train.optim import lr_at
from tests.conftest import LMLAB, write_config
from tests.test_checkpoint import stable_events, wait_for, weights
from tests.test_distributed import finish, torchrun


def test_the_plan_counts_steps_evals_at_their_interval_and_the_end_and_the_checkpoints_between():
    plan = BudgetPlan(60.0, step_seconds=0.1, eval_seconds=1.0, checkpoint_seconds=0.5)
    # Steps 21..100: 80 steps; evals at 40, 60, 80, 100; checkpoints with each eval and at 30, 90 (not 60).
    assert seconds_needed(20, 80, plan, 20, 30) == pytest.approx(80 * 0.1 + 4 * 1.5 + 2 * 0.5)
    # Steps 21..95: the last step is evaluated off the interval; 90 is a checkpoint only.
    assert seconds_needed(20, 75, plan, 20, 30) == pytest.approx(75 * 0.1 + 4 * 1.5 + 2 * 0.5)
    assert seconds_needed(20, 0, plan, 20, 30) == 0.0
    fit = steps_that_fit(30.0, 20, plan, 20, 30)
    assert seconds_needed(20, fit, plan, 20, 30) <= 30.0 < seconds_needed(20, fit + 1, plan, 20, 30)
    assert steps_that_fit(0.05, 20, plan, 20, 30) == 0


def budgeted(tmp_path, dataset, seconds: float, overrides=()) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset, max_iters=7),
                      [f"train.budget_seconds={seconds}", "train.eval_interval=50", "train.checkpoint_interval=40",
                       "train.log_interval=1", *overrides])
    return Trainer(cfg, tmp_path / "run", "cpu")


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_budgeted_run_times_its_start_then_lays_the_schedule_over_the_steps_that_fill_the_budget(
        tmp_path, char_dataset, schedule):
    result = budgeted(tmp_path, char_dataset, 2.0, [f"train.schedule={schedule}"]).run()
    run = RunDir(result.run_dir)
    events = run.events()
    plan = BudgetPlan(**{k: v for k, v in next(e for e in events if e["event"] == "budget").items() if k != "event"})
    # max_iters = 7 in the config is replaced by the plan, which config.toml records.
    assert result.steps == plan.max_iters == run.config().train.max_iters > plan.step > 2
    assert next(e["step"] for e in events if e["event"] == "checkpoint") == 2  # the timed one
    assert [e["step"] for e in events if e["event"] == "eval"] == [*range(50, plan.max_iters, 50), plan.max_iters]
    # The plan fills what was left of the budget: one more step would not have fitted.
    left = plan.seconds - plan.spent
    steps = plan.max_iters - plan.step
    assert seconds_needed(plan.step, steps, plan, 50, 40) <= left < seconds_needed(plan.step, steps + 1, plan, 50, 40)
    # Before the plan the LR warms up and holds its peak; after it, the schedule runs over max_iters to min_lr.
    cfg = run.config().train
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert all(lrs[s] == pytest.approx(cfg.learning_rate * min(1, s / (cfg.warmup_iters + 1))) for s in range(1, plan.step))
    assert all(lrs[s] == pytest.approx(lr_at(s - 1, cfg)) for s in range(plan.step + 1, plan.max_iters + 1))
    if schedule == "wsd":
        assert lrs[plan.max_iters] == pytest.approx(cfg.min_lr)
    else:
        assert lrs[plan.max_iters] < cfg.min_lr + 0.01 * (cfg.learning_rate - cfg.min_lr)
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{plan.max_iters:06d}"


def test_a_budget_used_up_before_its_plan_ends_the_run_at_the_plan(tmp_path, char_dataset, capsys):
    result = budgeted(tmp_path, char_dataset, 0.01).run()
    plan = next(e for e in RunDir(result.run_dir).events() if e["event"] == "budget")
    assert result.steps == plan["max_iters"] == plan["step"] == 13  # 2 untimed, then the 10 timed steps and one
    assert "nothing is left, the run ends here" in " ".join(capsys.readouterr().out.split())


def test_budget_settings_are_checked(tmp_path, char_dataset, capsys):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    for overrides, message in ((["train.budget_seconds=-1"], "must be 0"),
                               (["train.budget_seconds=30", "train.max_seconds=10"], "set one of them"),
                               (["train.budget_seconds=30", "train.lr_decay_iters=100"], "lr_decay_iters = 0")):
        with pytest.raises(UserError, match=message):
            load_config(config, overrides)
    for args, message in ((["--budget", "5 days"], "'5 days' is not a positive duration"),
                          (["--budget", "0s"], "not a positive duration"),
                          (["--resume", str(tmp_path / "run"), "--budget", "30s"], "keeps the plan it made")):
        assert main(["train", *([] if "--resume" in args else [str(config)]), *args, "--device", "cpu"]) == 2
        assert message in " ".join(capsys.readouterr().err.split())


def test_a_planned_run_resumes_with_its_budget_or_by_steps_but_not_with_another_budget(tmp_path, char_dataset):
    result = budgeted(tmp_path, char_dataset, 1.0).run()
    run = result.run_dir
    with pytest.raises(UserError, match="planned its 1 s budget"):
        Trainer(load_config(run / "config.toml", ["train.budget_seconds=5"]), run, "cpu", resume=True)
    again = Trainer(load_config(run / "config.toml"), run, "cpu", resume=True).run()
    assert again.steps == result.steps  # nothing left to train: the plan is kept, not timed again
    more = load_config(run / "config.toml", ["train.budget_seconds=0", f"train.max_iters={result.steps + 10}"])
    assert Trainer(more, run, "cpu", resume=True).run().steps == result.steps + 10


@pytest.mark.slow
def test_a_budgeted_run_killed_after_its_plan_resumes_bitwise_without_timing_again(tmp_path, char_dataset):
    """Two continuations of the same budgeted run, killed with -9 once its plan was checkpointed: one straight to
    the end, one killed twice more on the way; both must end as one run, with the plan made once."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    run = tmp_path / "killed"
    settings = ["--budget", "8s", "--set", "train.checkpoint_interval=7", "--set", "train.log_interval=3",
                "--set", "train.eval_interval=25", "--set", "model.dropout=0.1", "--set", "train.keep_checkpoints=50"]
    proc = subprocess.Popen([LMLAB, "train", config, "--run", run, "--device", "cpu", *settings],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def checkpoints_after_plan(path, count):
        """On disk, with `latest` naming one: the checkpoint event is logged before the folder is written."""
        planned = [e["step"] for e in RunDir(path).events() if e["event"] == "budget"]
        latest = pointer(RunDir(path).checkpoints, "latest")
        saved = [f for f in RunDir(path).step_folders() if planned and int(f.name[5:]) > planned[0]]
        return planned and latest is not None and int(latest.name[5:]) > planned[0] and len(saved) >= count

    wait_for(lambda: checkpoints_after_plan(run, 1) or proc.poll() is not None)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run ended before it could be killed"
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    subprocess.run([LMLAB, "train", "--resume", straight], check=True, capture_output=True, timeout=300)
    for count in (4, 9):  # checkpoints after the plan: kills land between them, mid-interval
        proc = subprocess.Popen([LMLAB, "train", "--resume", run], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(lambda: checkpoints_after_plan(run, count) or proc.poll() is not None)
        proc.kill()
        proc.wait()
    subprocess.run([LMLAB, "train", "--resume", run], check=True, capture_output=True, timeout=300)
    assert stable_events(run) == stable_events(straight)
    assert len([e for e in RunDir(run).events() if e["event"] == "budget"]) == 1
    straight_weights, resumed_weights = weights(straight), weights(run)
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)


@pytest.mark.slow
def test_the_ranks_of_a_torchrun_job_make_one_plan_together(tmp_path, char_dataset):
    """Each rank times its own steps; the plan is made from their mean, so both train and evaluate the same steps
    (ranks that disagreed would wait for each other's collectives until the job timed out)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    run = tmp_path / "run"
    finish(torchrun([str(config), "--run", str(run), "--budget", "10s", "--set", "train.grad_accum_steps=2",
                     "--set", "train.eval_interval=25"]))
    events = RunDir(run).events()
    plans = [e for e in events if e["event"] == "budget"]
    assert len(plans) == 1 and plans[0]["max_iters"] > plans[0]["step"]
    assert events[-1]["event"] == "end" and events[-1]["step"] == plans[0]["max_iters"]
    assert [e["step"] for e in events if e["event"] == "eval"][-1] == plans[0]["max_iters"]
