"""`train.budget_seconds` / `lmlab train --budget`: the plan's arithmetic, a budgeted run laid over its plans without
a jump in the LR, budgets too small for anything, exact resume without timing anything again, and (marked serial: a
verdict on wall time) a budget that holds when a CPU hog starts mid-run. How close runs end to their budgets on a
machine, with and without load, is measured by benchmarks/budget_under_load.py and benchmarks/cpu_speedrun.py."""

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.commands import main
from lmlab.core.config import TrainConfig, load_config
from lmlab.core.errors import UserError
from lmlab.run.checkpoint import pointer
from lmlab.run.rundir import RunDir
from lmlab.train.budget import Budget, BudgetClock, Probes
from lmlab.train.distributed import Parallel
from lmlab.train.planning import BudgetPlan, Measured, make_plan, seconds_needed, steps_that_fit
from lmlab.train.schedule import Schedule, lr_at
from lmlab.train.loop import Trainer
from tests.helpers import LMLAB, finish, stable_events, torchrun, wait_for, weights, write_config, write_fit


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
    ended = BudgetPlan(60.0, step_seconds=0.1, eval_seconds=1.0, checkpoint_seconds=0.5, finish_seconds=0.3)
    assert seconds_needed(20, 80, ended, 20, 30) == pytest.approx(80 * 0.1 + 4 * 1.5 + 2 * 0.5 + 0.3)  # and the end


def test_a_plan_shortens_a_warmup_longer_than_a_tenth_of_its_steps_rising_from_where_the_lr_stands():
    """warmup_iters = 50 and 43 planned steps ended still warming up: now the LR rises from where step 11 left it to
    the peak within a tenth of the steps left, then decays to min_lr at the plan's last step, never jumping."""
    train = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, budget_seconds=60.0, eval_interval=1000,
                        eval_iters=10)
    measured = Measured(spent=14.0, pace=1.0, eval_batch=0.01, plot=0.1, checkpoint=0.1, finish=0.3)
    share = lr_at(11, train) / train.learning_rate
    plan = make_plan(BudgetPlan(60.0), 12, measured, train, (1000, 1000), "planned", share)
    assert 12 < plan.warmup < 50 and plan.warmup - 12 == max(1, round(0.1 * (plan.max_iters - 12)))
    lrs = [plan.lr(s, train) for s in range(11, plan.max_iters)]
    rising = lrs[:plan.warmup - 11 + 1]
    assert all(a < b for a, b in zip(rising, rising[1:])) and rising[-1] == pytest.approx(train.learning_rate)
    assert max(b - a for a, b in zip(lrs, lrs[1:])) <= (1 - share) * train.learning_rate / 2  # no jump
    assert lrs[-1] == pytest.approx(train.min_lr)
    said = plan.describe(BudgetPlan(60.0), train, (1000, 1000))
    assert f"the peak LR at step {plan.warmup}, not at 50 (train.warmup_iters" in said
    # A warmup within a tenth of the steps is the config's own.
    short = dataclasses.replace(train, warmup_iters=2)
    assert make_plan(BudgetPlan(60.0), 1, measured, short, (1000, 1000), "planned", 0.3).warmup == 0


def test_a_plan_scores_fewer_eval_batches_where_evaluations_would_take_more_than_a_tenth_of_the_budget():
    """Each evaluation scores the first of its fixed batches; as many as keep them all within a tenth of the budget
    (the count is eval_interval's), and the last one, when no step fits any more, within what is left."""
    train = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, budget_seconds=60.0, eval_interval=100,
                        eval_iters=50)
    costly = Measured(spent=5.0, pace=0.1, eval_batch=0.2, plot=0.1, checkpoint=0.05, finish=0.3)
    plan = make_plan(BudgetPlan(60.0), 12, costly, train, (100, 1000), "planned", 1.0)
    evals = plan.max_iters // 100 + (plan.max_iters % 100 != 0)
    assert 1 <= plan.eval_iters < 50 and evals * plan.eval_seconds <= 0.1 * 60.0
    assert plan.eval_seconds == pytest.approx(costly.eval_seconds(plan.eval_iters))
    cheap = dataclasses.replace(costly, eval_batch=0.0001)
    assert make_plan(BudgetPlan(60.0), 12, cheap, train, (100, 1000), "planned", 1.0).eval_iters == 50
    late = dataclasses.replace(costly, spent=59.0)  # 1 s left: no step with an evaluation of plan.eval_iters fits
    end = make_plan(plan, 40, late, train, (100, 1000), "evaluation", 0.5)
    assert end.eval_iters < plan.eval_iters and end.max_iters - 40 <= 1
    assert end.needed(max(1, end.max_iters - 40), (100, 1000)) <= 1.0 + end.step_seconds


def test_a_plan_trains_the_steps_that_fit_before_its_last_evaluation_takes_what_is_left():
    """The GPU preset on an AVX2 CPU (13 s steps, 8 s an evaluation batch, eval_iters 200) planned at 100 s of a
    300 s budget: no more steps and a last evaluation of 24 batches a split (192 s). Now the steps that fit beside
    evaluations within a tenth of the budget; the last evaluation takes what is left only where none fits."""
    train, intervals = TrainConfig(eval_iters=200, warmup_iters=100), (250, 1000)
    measured = Measured(spent=100.0, pace=13.0, eval_batch=8.0, plot=0.3, checkpoint=0.6, finish=0.6)
    plan = make_plan(BudgetPlan(300.0), 5, measured, train, intervals, "planned", 0.0)
    assert plan.max_iters - 5 >= 12 and plan.eval_seconds <= 0.1 * 300.0  # 13 more (192 s), 3 batches a split
    assert abs(plan.spent + plan.needed(plan.max_iters - 5, intervals) - 300.0) <= measured.pace
    late = make_plan(plan, 19, dataclasses.replace(measured, spent=280.0), train, intervals, "evaluation", 0.5)
    assert late.max_iters == 19 and 1 < late.eval_iters < 3 and late.eval_seconds <= 20.0 - 1.2


def budgeted(tmp_path, dataset, seconds: float, overrides=()) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset, max_iters=7),
                      [f"train.budget_seconds={seconds}", "train.eval_interval=50", "train.checkpoint_interval=40",
                       "train.log_interval=1", *overrides])
    return Trainer(cfg, tmp_path / "run", "cpu")


def joined(plans: list[BudgetPlan]) -> list[tuple[BudgetPlan, BudgetPlan]]:
    """Consecutive plans whose LR must join without a jump: those the run goes on training under. A plan made when
    time ran out, with at most its anchor step left, puts that last step at min_lr instead (a slow moment near the
    end of a short budget makes one)."""
    return [(before, plan) for before, plan in zip(plans, plans[1:]) if plan.max_iters - 1 > plan.anchor]


def assert_joined(plans: list[BudgetPlan], cfg) -> None:
    """Each plan goes on from where the one before had the LR: a shortened warmup rises from the LR of the step
    before it; a decay is laid from where the schedule stood at its anchor."""
    for before, plan in joined(plans):
        if plan.warmup > plan.step:
            assert plan.warmup_from * cfg.learning_rate == pytest.approx(before.lr(plan.step - 1, cfg))
        else:
            assert before.lr(plan.anchor, cfg) == pytest.approx(plan.lr(plan.anchor, cfg))


def test_steps_of_seconds_are_planned_before_any_is_timed_where_one_more_would_leave_the_budget():
    """A 60 s budget of 13 s steps (the GPU preset on an AVX2 CPU) had no time left when its first step was timed and
    ended at 76 s: once the costs are timed (after the first step), the untimed steps are the pace, and one more with
    the smallest end (an evaluation of a batch a split, a checkpoint, the exit) must fit, or the run is planned now."""
    def clock(spent: float) -> BudgetClock:
        made = BudgetClock(60.0, time.perf_counter() - spent, 0.0, first_step=0)
        for step in (1, 2):
            made.add_step(step, 13.0)
        made.plot_seconds = 0.3
        for cost, seconds in (("checkpoint", 0.3), ("finish", 0.6), ("eval", 5.0)):
            made.took(cost, seconds)
        return made

    assert not clock(30.0).due()  # 30 + 13 + 6.2 s: it trains on, and times that step
    untimed = BudgetClock(60.0, time.perf_counter() - 50.0, 0.0, first_step=0)
    untimed.add_step(1, 13.0)
    assert not untimed.due()  # before its costs are timed nothing but a budget gone makes a plan
    late = clock(42.0)
    assert late.due()  # 42 + 13 + 6.2 s
    measured = Measured(*late.measured())
    assert measured.pace == 13.0 and measured.eval_batch == 5.0
    plan = make_plan(BudgetPlan(60.0), 2, measured, TrainConfig(eval_iters=200, warmup_iters=100), (250, 1000),
                     "planned", 0.0)
    assert plan.max_iters == 2 and 1 <= plan.eval_iters < 200  # it ends here, with an evaluation of what is left
    assert plan.spent + plan.eval_seconds + plan.checkpoint_seconds + plan.finish_seconds <= 60.0


def test_a_costly_first_evaluation_on_a_cpu_is_not_made_twice():
    """The evaluation a budget times comes after one that pays one-time costs; on a CPU evaluations run eager, so
    where that one took a share of the budget (an evaluation of seconds) it paid no compile, and is the cost."""
    def evaluations(seconds: float, device: str) -> int:
        calls = []
        probes = Probes(lambda: None, lambda: calls.append(time.sleep(0.35)), lambda: None)
        budget = Budget(seconds, Schedule(TrainConfig()), Parallel(), torch.device(device), (250, 1000), probes,
                        lambda plan, line: None)
        budget.start(None, 0.0, 0)
        budget.step_timed(1, 2.0)
        return len(calls)

    assert evaluations(10.0, "cpu") == 1  # 0.35 s: more than 3% of the budget
    assert evaluations(100.0, "cpu") == 2  # under 3%: its one-time costs could be much of it
    assert evaluations(10.0, "meta") == 2  # elsewhere the first may have compiled


def plans_of(run) -> list[BudgetPlan]:
    return [BudgetPlan(**{k: v for k, v in e.items() if k != "event"}) for e in RunDir(run).events()
            if e["event"] == "budget"]


def roomier(seconds: float, run: Path, steps: int, eval_interval: int, checkpoint_interval: int) -> float:
    """A budget for another try of a run this machine was too slow or busy for (its start used `seconds` up, or
    left fewer steps than the test needs): the seconds its start took, then `steps` more as its first plan timed
    them, with half as much again to spare (and at least `seconds`). A budget test's limit is derived from the
    machine's measured speed; its verdicts are on what the run did with it."""
    plans = plans_of(run)
    if not plans:
        return 2 * seconds
    first = plans[0]
    needed = seconds_needed(first.step, steps, first, eval_interval, checkpoint_interval)
    return first.spent + max(seconds, 1.5 * needed)


def fits(run: Path, steps: int = 1) -> bool:
    """Whether a run's first plan left `steps` to train after it (its start did not use the budget up)."""
    plans = plans_of(run)
    return bool(plans) and plans[0].max_iters - plans[0].step >= steps


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.slow
def test_a_budgeted_run_times_its_start_then_lays_the_schedule_over_the_steps_that_fill_the_budget(
        tmp_path, char_dataset, schedule):
    seconds = 2.0
    for attempt in range(3):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        result = budgeted(folder, char_dataset, seconds, [f"train.schedule={schedule}"]).run()
        if fits(result.run_dir):
            break
        seconds = roomier(seconds, result.run_dir, 20, 50, 40)
    run = RunDir(result.run_dir)
    events, plans = run.events(), plans_of(result.run_dir)
    first, last = plans[0], plans[-1]
    # max_iters = 7 in the config is replaced by the newest plan, which config.toml records.
    assert result.steps == last.max_iters == run.config().train.max_iters > first.step > 2
    assert next(e["step"] for e in events if e["event"] == "checkpoint") == 1  # the timed one, after the first step
    assert [e["step"] for e in events if e["event"] == "eval"] == [*range(50, last.max_iters, 50), last.max_iters]
    # The first plan filled what was left of the budget: its end is the nearest to it, a step either way.
    left, steps = first.seconds - first.spent, first.max_iters - first.step
    miss = [abs(seconds_needed(first.step, n, first, 50, 40) - left) for n in (steps - 1, steps, steps + 1)]
    assert miss[1] == min(miss)
    # Planned again at every evaluation but the last (and when the pace drifted), each plan logged
    assert {e["step"] for e in events if e["event"] == "eval"} - {last.max_iters} <= {p.step for p in plans}
    # Before the plan the LR warms up and holds its peak; after it, each step's LR is the plan in force's, the
    # plans join without a jump, and the last step is at min_lr.
    cfg = run.config().train
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert all(lrs[s] == pytest.approx(cfg.learning_rate * min(1, s / (cfg.warmup_iters + 1))) for s in range(1, first.step + 1))
    assert_joined(plans, cfg)
    for s in range(first.step + 1, last.max_iters + 1):
        in_force = [p for p in plans if p.step < s][-1]
        assert lrs[s] == pytest.approx(in_force.lr(s - 1, cfg))
    # The last plan's own last step is at min_lr; the step the run ended on was set by the plan in force before a
    # plan made at the end (timed steps drift), so it is near min_lr, or, cut by a slow moment, still decaying.
    assert last.lr(last.max_iters - 1, cfg) == pytest.approx(cfg.min_lr)
    near = cfg.learning_rate if last.reason == "out of time" else cfg.min_lr + 0.1 * (cfg.learning_rate - cfg.min_lr)
    assert lrs[last.max_iters] < near
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{last.max_iters:06d}"
    # every checkpoint holds the plan in force when it was written
    for folder in run.step_folders():
        saved = BudgetPlan()
        saved.load_state_dict(json.loads((folder / "state.json").read_text())["training"]["budget"])
        step = int(folder.name[5:])
        assert saved == ([p for p in plans if p.step <= step] or [BudgetPlan(seconds)])[-1]


@pytest.mark.slow
def test_a_budget_used_up_before_its_steps_are_timed_ends_the_run_at_once(tmp_path, char_dataset, capsys):
    result = budgeted(tmp_path, char_dataset, 0.01).run()
    plan = plans_of(result.run_dir)[-1]
    assert result.steps == plan.max_iters == plan.step <= 3 and plan.reason == "out of time"
    assert plan.step_seconds == 0 and plan.spent >= 0.01  # the steps after the first two are timed: none yet
    said = " ".join(capsys.readouterr().out.split())
    assert f"budget 0.01 s: used up at step {plan.step}" in said and "before its steps could be timed" in said
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{plan.step:06d}"


@pytest.mark.slow
def test_a_budget_start_up_used_up_ends_before_the_first_step_with_a_checkpoint(tmp_path, char_dataset):
    """`--budget 0.001s`: before this, it trained 13 steps for 13 s."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    done = subprocess.run([LMLAB, "train", config, "--run", tmp_path / "run", "--device", "cpu", "--budget", "0.001s"],
                          capture_output=True, text=True, timeout=120)
    said = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "budget 0.001 s: start-up alone took" in said and "the run ends before its first step" in said
    assert "no evaluation ran: the run ended at step 0" in said
    assert [f.name for f in RunDir(tmp_path / "run").step_folders()] == ["step_000000"]
    assert RunDir(tmp_path / "run").events()[-1]["event"] == "end"


@pytest.mark.slow
def test_a_budget_too_small_for_a_whole_evaluation_ends_with_a_shorter_one_and_a_checkpoint(tmp_path, char_dataset,
                                                                                             capsys):
    """An evaluation at train.eval_iters (2,000 batches a split) takes longer than the whole budget: the run scores
    as few batches as fit, and says so with the figures its sentence adds up."""
    result = budgeted(tmp_path, char_dataset, 1.0, ["train.eval_iters=2000"]).run()
    plan = plans_of(result.run_dir)[-1]
    assert result.steps == plan.max_iters and 1 <= plan.eval_iters < 2000
    assert RunDir(result.run_dir).config().train.eval_iters == plan.eval_iters  # what its evaluations scored
    said = " ".join(capsys.readouterr().out.split())
    assert f"evaluations of {plan.eval_iters} batch" in said and "not 2000 (train.eval_iters)" in said
    if plan.max_iters == plan.step:  # the sentence's sum is the one its figures make
        needed = plan.needed(1, (50, 40))
        assert needed > plan.seconds - plan.spent
        assert f"less than one more step needs ({needed:.1f} s: {1000 * plan.step_seconds:.1f} ms a step" in said
    events = RunDir(result.run_dir).events()
    assert [e["step"] for e in events if e["event"] == "eval"][-1] == plan.max_iters
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{plan.max_iters:06d}"


@pytest.mark.slow
def test_a_step_longer_than_the_budget_left_ends_the_run_with_its_evaluation_and_checkpoint(tmp_path, char_dataset,
                                                                                            capsys):
    """Steps of half a second or more (as a hog makes them) against a budget that has less than that left once
    they are timed."""
    slow = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=256", "train.batch_size=16",
            "train.eval_iters=1"]
    result = budgeted(tmp_path, char_dataset, 1.5, slow).run()
    plan = plans_of(result.run_dir)[-1]
    assert result.steps == plan.max_iters == plan.step
    said = " ".join(capsys.readouterr().out.split())
    assert f"budget 1.5 s: {max(0.0, 1.5 - plan.spent):.1f} s left at step {plan.step}" in said or \
        f"budget 1.5 s: used up at step {plan.step}" in said
    events = RunDir(result.run_dir).events()
    assert events[-1]["event"] == "end" and [e["step"] for e in events if e["event"] == "eval"][-1] == plan.step
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{plan.step:06d}"


def test_budget_settings_are_checked(tmp_path, char_dataset, capsys):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    for overrides, message in ((["train.budget_seconds=-1"], "must be 0"),
                               (["train.budget_seconds=30", "train.max_seconds=10"], "set one of them"),
                               (["train.budget_seconds=30", "train.lr_decay_iters=100"], "lr_decay_iters = 0")):
        with pytest.raises(UserError, match=message):
            load_config(config, overrides)
    for args, message in ((["--budget", "5 days"], "'5 days' is not a duration above 0 and up to 366 days"),
                          (["--budget", "0s"], "not a duration above 0"),
                          (["--resume", str(tmp_path / "run"), "--budget", "30s"], "keeps the plan it made")):
        assert main(["train", *([] if "--resume" in args else [str(config)]), *args, "--device", "cpu"]) == 2
        assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
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
@pytest.mark.parametrize("size", [[], ["--size", "auto"]], ids=["preset", "size auto"])
def test_a_budgeted_run_killed_after_its_plan_resumes_bitwise_without_timing_again(tmp_path, char_dataset, size):
    """Two continuations of the same budgeted run, killed with -9 once its plan was checkpointed: one straight to
    the end, one killed twice more on the way; both must end as one run, with the plan made once (and a run sized
    by --size auto as any other: its shape is its config.toml's)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    write_fit(config, char_dataset, 30_000)
    settings = [*size, "--set", "train.checkpoint_interval=7", "--set", "train.log_interval=3",
                "--set", "train.eval_interval=25", "--set", "model.dropout=0.1", "--set", "train.keep_checkpoints=50",
                "--set", "train.threads=1"]  # bitwise: one thread in every process (lmlab.core.threads)

    def checkpoints_after_plan(path, count):
        """On disk, with `latest` naming one: the checkpoint event is logged before the folder is written."""
        planned = [e["step"] for e in RunDir(path).events() if e["event"] == "budget"]
        latest = pointer(RunDir(path).checkpoints, "latest")
        saved = [f for f in RunDir(path).step_folders() if planned and int(f.name[5:]) > planned[0]]
        return planned and latest is not None and int(latest.name[5:]) > planned[0] and len(saved) >= count

    seconds = 8.0
    for attempt in range(3):
        run = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([LMLAB, "train", config, "--run", run, "--device", "cpu", "--budget", f"{seconds}s",
                                 *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: checkpoints_after_plan(run, 1) or proc.poll() is not None)
        proc.kill()
        proc.wait()
        if proc.returncode == -9 and fits(run, 80):  # room for the kills below, 9 checkpoints after the plan
            break
        seconds = roomier(seconds, run, 90, 25, 7)
    assert proc.returncode == -9 and fits(run, 80), "the run ended before it could be killed, three budgets in a row"
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
    # Planned by the first process alone (again at its evaluations); no continuation timed or planned again.
    events = RunDir(run).events()
    resumed = next(i for i, e in enumerate(events) if e["event"] == "resume")
    planned = [i for i, e in enumerate(events) if e["event"] == "budget"]
    assert planned and planned[-1] < resumed
    sized = [e for e in RunDir(run).events() if e["event"] == "sizing"]
    assert len(sized) == bool(size) and all(RunDir(run).config().model.n_layer == e["depth"] for e in sized)
    straight_weights, resumed_weights = weights(straight), weights(run)
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)


@pytest.mark.slow
def test_the_ranks_of_a_torchrun_job_make_their_plans_together(tmp_path, char_dataset):
    """Each rank times its own steps; every plan (the first, at each evaluation, at a pace check) is made from their
    mean, so both train and evaluate the same steps (ranks that disagreed would wait for each other's collectives
    until the job timed out)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    seconds = 10.0
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        finish(torchrun([str(config), "--run", str(run), "--budget", f"{seconds}s", "--set",
                         "train.grad_accum_steps=2", "--set", "train.eval_interval=25"]))
        if fits(run):
            break
        seconds = roomier(seconds, run, 30, 25, 10)
    events, plans = RunDir(run).events(), plans_of(run)
    assert plans[0].reason == "planned" and plans[0].max_iters > plans[0].step
    # Every evaluation after the first plan plans again (one before it, while the first steps are still being
    # timed on a slow start, has nothing to re-plan).
    evals = {e["step"] for e in events if e["event"] == "eval" and e["step"] >= plans[0].step}
    assert evals - {plans[-1].max_iters} <= {p.step for p in plans}
    assert events[-1]["event"] == "end" and events[-1]["step"] == plans[-1].max_iters
    assert [e["step"] for e in events if e["event"] == "eval"][-1] == plans[-1].max_iters


def budgeted_process(tmp_path, dataset, seconds: float, hog_at: float | None) -> tuple[float, Path]:
    """`lmlab train --budget` in its own process, with a CPU hog (one spinning process) from `hog_at` seconds after
    the start until the run exits; its wall time, start to exit, and its run."""
    config = write_config(tmp_path / "small.toml", dataset)
    run = tmp_path / "run"
    shape = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "train.batch_size=32",
             "train.eval_interval=250", "train.eval_iters=10", "train.checkpoint_interval=1000",
             "train.log_interval=10"]  # the speedrun preset's shape and cadence
    command = [LMLAB, "train", config, "--run", run, "--device", "cpu", "--budget", f"{seconds:g}s",
               *(arg for setting in shape for arg in ("--set", setting))]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hog = None
    while proc.poll() is None:
        if hog_at is not None and hog is None and time.perf_counter() - started >= hog_at:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.01)
    wall = time.perf_counter() - started
    if hog is not None:
        hog.kill()
        hog.wait()
    assert proc.returncode == 0, proc.stderr.read()
    return wall, run


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("seconds, hog_at", [(60, 20), (20, None)])
def test_a_budget_holds_when_the_machine_gets_busy_mid_run(tmp_path, char_dataset, seconds, hog_at):
    """A 60 s budget with a CPU hog started 20 s in ends within 5% of 60 s, process start to exit,
    its LR decayed to the end; without the hog (20 s, to keep the suite short) it ends as it did before the hog."""
    share = hog_at / seconds if hog_at else None  # the hog comes a third of the way in
    for attempt in range(3):  # a machine whose start takes the budget gets a budget that leaves it steps
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        wall, run = budgeted_process(folder, char_dataset, seconds, share and share * seconds)
        if fits(run, 100):
            break
        seconds = roomier(seconds, run, 150, 250, 1000)
    events, cfg = RunDir(run).events(), RunDir(run).config().train
    plans = plans_of(run)
    # Within 5% of the budget, and of the end's costs as the run measured them (its last evaluation, plot and exit),
    # which load that changes near the end (the hog's, and on a busy machine others') makes longer than planned.
    first, last = plans[0], plans[-1]
    end = last.eval_seconds + last.finish_seconds
    assert 0.95 * seconds <= wall <= 1.05 * seconds + end, f"{wall:.1f} s for a {seconds:.1f} s budget"
    lrs = [e["lr"] for e in events if e["event"] == "train"]
    assert events[-1]["event"] == "end" and events[-1]["step"] == plans[-1].max_iters
    assert plans[-1].lr(plans[-1].max_iters - 1, cfg) == pytest.approx(cfg.min_lr)  # the last step's LR
    assert lrs[-1] < cfg.min_lr + 0.1 * (cfg.learning_rate - cfg.min_lr)  # (logged every 10 steps)
    if hog_at:  # the pace fell and the run planned again for it, the LR following on without a jump
        # (by half or more where the hog was the only other load; on a machine busy already, by what it measured)
        slowed = max(p.step_seconds for p in plans) / first.step_seconds
        assert any(p.reason == "pace" and p.step_seconds >= min(1.5, slowed) * first.step_seconds for p in plans)
        assert_joined(plans, cfg)
