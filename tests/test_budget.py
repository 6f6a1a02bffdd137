"""`train.budget_seconds` / `lmlab train --budget`: the one planner's arithmetic, its refusal (the same sentence from
`plan` and `train`, before any step trains), a budgeted run whose LR follows the budget's clock to min_lr at its last
step, exact resume by steps, torchrun's ranks deciding alike, and (marked serial: a verdict on wall time) a budget
that holds when a CPU hog starts mid-run. The budget's promises over simulated machines are in
tests/test_budget_traces.py; how close real runs end to their budgets, with and without load, is measured by
benchmarks/budget_under_load.py and benchmarks/cpu_speedrun.py."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.commands import main
from lmlab.core.config import TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.data.shards import covered
from lmlab.run.checkpoint import pointer
from lmlab.run.rundir import RunDir
from lmlab.train.budget import (
    BY_STEPS,
    FINAL_SHARE,
    HELD_SHARE,
    MIN_STEPS,
    PACE_STEPS,
    Budget,
    BudgetRefused,
    Costs,
    Plan,
    final_windows,
    plan,
)
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import (
    LMLAB,
    cut_at_first_checkpoint,
    output,
    roomier,
    same_weights,
    stable_events,
    torchrun,
    wait_for,
    write_config,
    write_fit,
)


def test_the_plan_counts_steps_evals_at_their_interval_and_the_end_and_the_checkpoints_between():
    made = Plan(60.0, step=20, step_seconds=0.1, eval_seconds=1.0, checkpoint_seconds=0.5)
    # Steps 21..100: 80 steps; evals at 40, 60, 80, 100; checkpoints with each eval and at 30, 90 (not 60).
    assert made.needed(80, (20, 30)) == pytest.approx(80 * 0.1 + 4 * 1.5 + 2 * 0.5)
    # Steps 21..95: the last step is evaluated off the interval; 90 is a checkpoint only.
    assert made.needed(75, (20, 30)) == pytest.approx(75 * 0.1 + 4 * 1.5 + 2 * 0.5)
    assert made.needed(0, (20, 30)) == 0.0
    nearest = made.nearest(30.0, (20, 30))
    assert abs(made.needed(nearest, (20, 30)) - 30.0) == min(abs(made.needed(n, (20, 30)) - 30.0)
                                                             for n in (nearest - 1, nearest, nearest + 1))
    assert made.nearest(0.04, (20, 30)) == 0  # less than half a step left
    ended = dataclasses.replace(made, finish_seconds=0.3)
    assert ended.needed(80, (20, 30)) == pytest.approx(80 * 0.1 + 4 * 1.5 + 2 * 0.5 + 0.3)  # and the end


ONE_BATCH = TrainConfig().batch_size  # a val split of one batch's windows: a final score of one batch


def costs(step: float, eval_batch: float = 0.01) -> Costs:
    return Costs(step, eval_batch, eval_fixed=0.1, checkpoint=0.1, finish=0.4)


def test_a_plan_shortens_a_warmup_longer_than_a_tenth_of_its_steps():
    """warmup_iters = 50 and 43 planned steps ended still warming up: a plan keeps a warmup within a tenth of its
    steps, and says so."""
    train = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, budget_seconds=60.0, eval_interval=1000,
                        eval_iters=10)
    made = plan(60.0, 14.0, costs(1.0), train, (1000, 1000), ONE_BATCH)
    assert 0 < made.warmup < 50 and made.warmup == max(1, round(0.1 * made.max_iters))
    said = Budget(made, (1000, 1000)).describe(train)
    assert f"the peak LR at step {made.warmup}, not at 50 (train.warmup_iters" in said
    assert plan(60.0, 14.0, costs(1.0), dataclasses.replace(train, warmup_iters=2), (1000, 1000), ONE_BATCH).warmup == 2


def test_a_plan_scores_fewer_eval_batches_where_evaluations_would_take_more_than_a_tenth_of_the_budget():
    """Each evaluation scores the first of its fixed batches: as many as keep them all within a tenth of the budget
    (the count is eval_interval's)."""
    train = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, budget_seconds=60.0, eval_interval=100,
                        eval_iters=50)
    made = plan(60.0, 5.0, costs(0.1, eval_batch=0.2), train, (100, 1000), ONE_BATCH)
    evals = made.max_iters // 100 + (made.max_iters % 100 != 0)
    assert 1 <= made.eval_iters < 50 and evals * made.eval_seconds <= 0.1 * 60.0
    assert made.eval_seconds == pytest.approx(costs(0.1, 0.2).evaluation(made.eval_iters))
    assert plan(60.0, 5.0, costs(0.1, eval_batch=0.0001), train, (100, 1000), ONE_BATCH).eval_iters == 50


def test_a_plan_trains_the_steps_that_fit_beside_evaluations_of_their_share():
    """The GPU preset on an AVX2 CPU (13 s steps, 8 s an evaluation batch, eval_iters 200) planned at 100 s of a
    300 s budget: the plan trains the steps that fit beside evaluations kept within a tenth of the budget, never a
    last evaluation that takes the rest of it (24 batches a split would be 192 s)."""
    train, intervals = TrainConfig(eval_iters=200, warmup_iters=100), (250, 1000)
    made = plan(300.0, 100.0, Costs(13.0, 8.0, 0.3, 0.6, 0.6), train, intervals, ONE_BATCH)
    assert made.max_iters >= 12 and made.eval_seconds <= 0.1 * 300.0  # 13 steps (192 s), 3 batches a split
    assert abs(made.spent + made.needed(made.max_iters, intervals) - 300.0) <= 13.0 / 2


def test_a_budget_that_cannot_hold_its_minimum_is_refused_with_what_it_needs():
    """A 10.8M-parameter model of ~21 s a step: `plan --budget 60s` said "at least 95 s" and `train --budget 60s`
    ran anyway, to 92 s. Now one planner: two steps, an evaluation of one batch a split, the checkpoint and the end
    must fit what start-up and timing left, or nothing trains."""
    train = TrainConfig(eval_iters=20, warmup_iters=10)
    with pytest.raises(BudgetRefused) as refused:
        plan(60.0, 52.0, Costs(21.0, 2.0, 0.3, 0.25, 0.5), train, (250, 1000), ONE_BATCH)
    said = str(refused.value)
    assert said.startswith("budget 60 s: a step takes ~21 s here, and 2 steps, an evaluation of one batch a split")
    assert "the final score (1.00 s)" in said and isinstance(refused.value, UserError)
    assert "give a budget of at least 99 s." in said  # 52 + 2 x 21 + 2 + 0.3 + 0.25 + 1 + 0.5 = 98.05
    assert plan(99.0, 52.0, Costs(21.0, 2.0, 0.3, 0.25, 0.5), train, (250, 1000), ONE_BATCH).max_iters >= MIN_STEPS


@pytest.mark.parametrize("val_batch", [0.0, 1e-4, 0.003, 0.05, 0.4, 3.0, 40.0])
@pytest.mark.parametrize("step", [0.05, 13.0])
@pytest.mark.parametrize("seconds", [30.0, 75.0, 300.0, 7200.0])
def test_the_final_score_covers_the_whole_val_split_where_its_share_of_the_budget_holds_it(seconds, step, val_batch):
    """A run ends on one figure, the checkpoint it keeps scored on the val split, not the least of its noisy
    evaluations: the whole split where it fits FINAL_SHARE of the budget, else the whole batches that do (one at
    least), and more in the time the steps leave short of the budget; so the plan ends at least as near the budget
    as any step count with the share's score alone."""
    train, intervals, split = TrainConfig(batch_size=16, eval_iters=4, warmup_iters=0), (50, 100), 3932
    try:
        made = plan(seconds, 5.0, Costs(step, 2 * val_batch, 0.1, 0.1, 0.3), train, intervals, split)
    except BudgetRefused:
        assert seconds <= 75.0 and (step == 13.0 or val_batch == 40.0)  # two steps, or one batch, are too long
        return
    share = final_windows(split, 16, FINAL_SHARE * seconds, val_batch)
    assert made.val_windows == split and share <= made.final_windows <= split
    said = " ".join(Budget(made, intervals).describe(train).split())
    # The start line tells the windows planned, and when the end scores more or fewer (`Budget.final_windows`).
    assert (f"the final score on {covered(made.final_windows, split)} ({made.final_seconds:.1f} s)") in said
    assert ("more where the time left at the end holds them, fewer only where the run would end over 5% past its "
            "budget") in said
    assert ("the whole val split" in said) == (made.final_windows == split)
    assert made.final_seconds == pytest.approx(-(-made.final_windows // 16) * val_batch)
    if split * val_batch / 16 <= FINAL_SHARE * seconds:
        assert share == split  # the whole split, which fits its share
    else:
        assert share % 16 == 0 and (share == 16 or share // 16 * val_batch <= FINAL_SHARE * seconds)
        assert (share // 16 + 1) * val_batch > FINAL_SHARE * seconds  # and no more whole batches would fit

    def miss(n: int, windows: int) -> float:
        laid = dataclasses.replace(made, final_windows=windows, final_seconds=-(-windows // 16) * val_batch)
        return laid.spent + laid.needed(n, intervals) - seconds

    if made.final_windows > share:
        assert miss(made.max_iters, made.final_windows) <= 0  # grown only into time the steps leave
    nearest = min(abs(miss(n, share)) for n in range(max(MIN_STEPS, made.max_iters - 1), made.max_iters + 2))
    assert abs(miss(made.max_iters, made.final_windows)) <= nearest + 1e-9
    assert final_windows(split, 16, 1.0, 0.0) == split  # a free batch: the whole split


@pytest.mark.parametrize("late", [-20.0, -1.0, 0.0, 0.1, 0.5, 3.0, 14.0, 30.0])
@pytest.mark.parametrize("slower", [0.5, 1.0, 1.3, 2.2, 8.0])
@pytest.mark.parametrize("forward", [0.4, 1.0, 2.5], ids=lambda f: f"forward x{f}")
@pytest.mark.parametrize("whole", [True, False], ids=["whole split planned", "part planned"])
def test_the_final_score_keeps_its_promise_unless_the_run_would_end_past_its_budget(slower, forward, late, whole):
    """On simulated clocks: the final score scores the windows its plan promised, at the price a batch cost in the
    run's last evaluation, and more where what is left of the budget holds them (up to the whole split); fewer (those
    that fit, one batch at least) only where the promised ones would end the run over HELD_SHARE past its budget. A
    forward slowed otherwise than the steps (`forward` against `slower`: a plugin's Python loop, a step timed once)
    no longer makes its score fall short while time is left (4 of 10 plugin runs: 640 of 1,664 windows scored, 0.9 s
    under budget), nor run over it. A last step that ends a little late (its evaluation ran long) no longer shrinks a
    whole split promised at a fraction of a second to one batch (seed 004's shape: `the whole val split (0.2 s)`
    promised, 12 of 124 windows scored). A resumed run, on another process's clock, scores the windows planned."""
    train, intervals = TrainConfig(batch_size=16, eval_iters=4, warmup_iters=0), (50, 100)
    val_batch = 0.002 if whole else 0.2
    made = plan(300.0, 5.0, Costs(0.1, 2 * val_batch, 0.1, 0.1, 0.3), train, intervals, 3932)
    assert (made.final_windows == 3932) == whole  # 246 batches: 0.5 s, or 49 s (more than 5% of the budget)
    budget = Budget(made, intervals)
    for step in range(1, 8):  # steps at the new pace, none of them an evaluation's or a checkpoint's
        budget.after_step(step, 5.0 + 0.1 * slower * step)
    assert budget.pace == pytest.approx(0.1 * slower)
    spent = 300.0 - made.final_seconds - made.finish_seconds + late  # when the final score begins
    batch = val_batch * forward  # what a val batch costs now, as the last evaluation's batches of both splits did
    windows = budget.final_windows(16, spent, 2 * made.eval_iters * batch)
    left = 300.0 - spent - made.finish_seconds
    batches = lambda n: -(-n // 16)  # noqa: E731
    promised = spent + batches(made.final_windows) * batch + made.finish_seconds <= (1 + HELD_SHARE) * 300.0
    assert windows == 3932 or windows % 16 == 0
    if promised:  # the promise kept, and more only in what is left
        assert windows >= made.final_windows
        assert windows == made.final_windows or batches(windows) * batch <= left + 1e-9
    else:  # the run would end past its budget's share: what fits, one batch at least
        assert windows < made.final_windows and (windows == 16 or batches(windows) * batch <= left + 1e-9)
    room = max(left, batches(made.final_windows) * batch) if promised else left
    assert windows == 3932 or (windows // 16 + 1) * batch > room - 1e-9  # and no whole batch more would fit
    if whole and late <= 3.0 and forward <= 1:
        assert windows == 3932  # the whole split promised, and scored
    assert Budget(made, intervals, live=False).final_windows(16, spent, 2 * made.eval_iters * batch) == \
        made.final_windows


def test_a_resumed_budget_says_what_the_rest_takes_here_and_its_end_how_the_budget_held():
    """A 60 s plan checkpointed at step 240 after 24 s, resumed on a machine 3x slower: it goes on by the plan's steps,
    says so with what the rest needs as planned and how to end elsewhere, then, once PACE_STEPS steps are timed here,
    what the rest takes here; its end counts every process's seconds, and a checkpoint of the resumed run carries them
    to the next resume, whose decay by steps is the same to the last bit."""
    train, intervals = TrainConfig(batch_size=16, eval_iters=4, warmup_iters=0), (50, 100)
    made = plan(60.0, 5.0, Costs(0.1, 0.4, 0.1, 0.1, 0.3), train, intervals, 62)
    saved = dataclasses.asdict(dataclasses.replace(made, step=240, spent=24.0, position=0.4))
    budget = Budget.resumed(saved, 240, intervals, spent=3.0)  # this process's start-up: 3 s
    last = made.max_iters
    said = " ".join(budget.resume_line().split())
    rest = dataclasses.replace(made, step=240).needed(last - 240, intervals)
    assert said.startswith("budget 60 s: resumed at step 240 by its checkpoint's plan, by steps")
    assert (f"{last - 240:,} steps left, to min_lr at step {last:,}, then the final score on the whole val split; "
            f"24.0 s taken so far, and at the 100.0 ms a step planned the rest needs ~{rest:.1f} s, "
            f"~{24.0 + 3.0 + rest:.1f} s in all") in said
    assert f"resume it with {BY_STEPS}" in said
    spent, lines = 3.0, []
    for step in range(241, last + 1):
        spent += 0.3 + (3 * 0.5 if step % 50 == 0 else 0.0)  # steps and evaluations 3x slower
        budget.after_step(step, spent)
        lines += [(step, budget.line)] if budget.line else []
        assert budget.position(step) == Budget.resumed(saved, 240, intervals).position(step)  # by steps, untimed
        if step == 300:
            again = Budget.resumed(budget.state_dict(), step + 1, intervals)
            assert again.before == pytest.approx(24.0 + spent + 0.3)  # the seconds taken when step 301 begins
    assert [s for s, _ in lines] == [240 + PACE_STEPS]  # once, when the steps timed here are enough
    here = dataclasses.replace(made, step=245, step_seconds=0.3, eval_seconds=1.5,
                               final_seconds=3 * made.final_seconds).needed(last - 245, intervals)
    pace = " ".join(lines[0][1].split())
    assert (f"budget 60 s: steps take 300.0 ms here (100.0 ms planned): the {last - 245:,} left and the end need "
            f"~{here:.1f} s, the run ~{24.0 + 3.0 + 5 * 0.3 + here:.1f} s in all") in pace
    assert f"stop it and resume it with {BY_STEPS}" in pace  # more than 5% past the budget
    assert budget.end(spent)[0] == pytest.approx(24.0 + spent, abs=1e-3)
    assert " ".join(budget.ended(spent).split()).startswith(
        f"budget 60 s: resumed at step 240 by its plan, the run took {24.0 + spent:.1f} s "
        f"(+{24.0 + spent - 60.0:.1f} s, +{100 * ((24.0 + spent) / 60.0 - 1):.1f}%): 24.0 s to step 240, {spent:.1f} s "
        "in this process, its steps 300.0 ms (100.0 ms planned)")
    for step in range(301, last + 1):  # a second resume goes on by the first plan's decay, not one laid again
        assert again.position(step) == Budget.resumed(saved, 240, intervals).position(step)


def test_a_resumed_plan_without_its_pace_times_its_steps_before_it_says_what_the_rest_takes():
    """A checkpoint's plan from a version that kept no step's seconds: nothing is foreseen at the planned pace, and
    the steps timed here (an evaluation among the first) say what the rest takes."""
    older = {k: v for k, v in dataclasses.asdict(Plan(60.0, max_iters=200, step=40, spent=20.0, warmup=10)).items()
             if not k.endswith("_seconds") or k == "seconds"}
    budget = Budget.resumed(older, 48, (50, 100), spent=2.0)
    assert "20.0 s taken so far (what the rest takes here is said once 5 steps are timed here)" in budget.resume_line()
    lines = []
    for step in range(49, 201):
        budget.after_step(step, 2.0 + 0.2 * (step - 48))
        lines += [budget.line] if budget.line else []
    assert len(lines) == 1 and "steps take 200.0 ms here: the 146 left and the end need ~29.2 s" in lines[0]


def budgeted(tmp_path, dataset, seconds: float, overrides=()) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset, max_iters=7),
                      [f"train.budget_seconds={seconds}", "train.eval_interval=50", "train.checkpoint_interval=40",
                       "train.log_interval=1", *overrides])
    return Trainer(train_job(cfg, tmp_path / "run", "cpu"))


def plans_of(run) -> list[Plan]:
    return [Plan.of(e) for e in RunDir(run).events() if e["event"] == "budget"]


def trained(tmp_path, dataset, seconds: float, overrides=(), steps: int = 1):
    """A budgeted Trainer's run that planned at least `steps` steps, the budget made roomier while the machine's
    start leaves it too little (three tries)."""
    for attempt in range(3):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        try:
            result = budgeted(folder, dataset, seconds, overrides).run()
        except BudgetRefused as refused:
            seconds = roomier(seconds, str(refused))
            continue
        if plans_of(result.run_dir)[0].max_iters >= steps:
            return result, seconds
        seconds *= 2
    pytest.fail(f"three budgets in a row left fewer than {steps} steps")


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.slow
def test_a_budgeted_run_plans_before_its_first_step_then_its_lr_follows_the_clock_to_min_lr(
        tmp_path, char_dataset, schedule, capsys):
    result, seconds = trained(tmp_path, char_dataset, 2.0, [f"train.schedule={schedule}"], steps=60)
    run = RunDir(result.run_dir)
    events, plans = run.events(), plans_of(result.run_dir)
    first, last = plans[0], plans[-1]
    assert (first.step, first.reason) == (0, "planned") and last.reason == "last"
    assert result.steps == last.max_iters  # the last step decided, a step ahead
    assert [e["step"] for e in events if e["event"] == "eval"] == [*range(50, last.max_iters, 50), last.max_iters]
    said = " ".join(capsys.readouterr().out.split())
    assert "the LR follows the budget's clock" in said
    # The warmup (cut short where a stall of the machine left the budget a few steps, a run ending in it), then an LR
    # that never rises, and min_lr at the last step, unless one step took what was left (tests/test_budget_traces.py
    # holds these over simulated stalls and loads).
    cfg = run.config().train
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert last.warmup == min(first.warmup, last.max_iters - 1)
    assert all(lrs[s] == pytest.approx(cfg.learning_rate * s / (first.warmup + 1)) for s in range(1, last.warmup + 1))
    after = [lrs[s] for s in range(last.warmup + 1, last.max_iters + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(cfg.min_lr) or "the run ends here." in said
    assert run.checkpoint("latest").name == f"step_{last.max_iters:06d}"
    # Then the final score, on the val windows that what was left of the budget held: the whole split, or whole
    # batches of it.
    final = events[-2]
    assert [e["event"] for e in events][-2:] == ["final", "end"] and final["step"] == last.max_iters
    assert 0 < final["windows"] <= first.val_windows == final["split_windows"]
    assert final["windows"] == first.val_windows or final["windows"] % cfg.batch_size == 0
    # config.toml keeps the settings asked for; a budget's fits are its plan's (events and checkpoints)
    assert (cfg.max_iters, cfg.eval_iters, cfg.warmup_iters) == (7, 4, 5)
    for folder in run.step_folders():  # every checkpoint holds the plan as it stood at its step
        saved = Plan.of(json.loads((folder / "state.json").read_text())["training"]["budget"])
        assert saved.step == int(folder.name[5:]) and saved.seconds == seconds


@pytest.mark.slow
def test_a_budget_start_up_used_up_is_refused_by_train_and_plan_alike_writing_nothing(tmp_path, char_dataset):
    """`--budget 0.001s`: no step and no checkpoint fit it, so `train` refuses it as `plan` does, with the same
    sentence, before a run folder exists and before any timing (its FLOPs alone, at the most a step computes here,
    cannot fit)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    said = {}
    for command in ("train", "plan"):
        args = [LMLAB, command, config, "--device", "cpu", "--budget", "0.001s"]
        done = subprocess.run([*args, "--run", tmp_path / "run"] if command == "train" else args,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        said[command] = " ".join(done.stderr.split())
        assert re.search(r"error: budget 0.001 s: a step takes at least [\d.e-]+ s here \(its [\d.e+]+ FLOPs at .*?\), "
                         r"and 2 steps, an evaluation of one batch a split \([\d.]+ s\), the checkpoint \([\d.]+ s\), "
                         r"the final score \([\d.]+ s\) and the end \([\d.]+ s\) need [\d.]+ s after the [\d.]+ s that "
                         r"start-up and its timing take; give a budget of at least \d+ s\.",
                         said[command]), said[command]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_budget_too_small_for_a_whole_evaluation_scores_fewer_batches_and_says_so(tmp_path, char_dataset, capsys):
    """An evaluation at train.eval_iters (2,000 batches a split) takes longer than the whole budget: the run scores
    as few batches as fit, says so, and keeps train.eval_iters as asked (a later resume by steps scores 2,000)."""
    result, _ = trained(tmp_path, char_dataset, 1.0, ["train.eval_iters=2000"])
    made = plans_of(result.run_dir)[0]
    assert result.steps == plans_of(result.run_dir)[-1].max_iters and 1 <= made.eval_iters < 2000
    assert RunDir(result.run_dir).config().train.eval_iters == 2000
    said = " ".join(capsys.readouterr().out.split())
    assert f"evaluations of {made.eval_iters} batch" in said and "not 2000 (train.eval_iters)" in said
    events = RunDir(result.run_dir).events()
    assert [e["step"] for e in events if e["event"] == "eval"][-1] == result.steps
    assert RunDir(result.run_dir).checkpoint("latest").name == f"step_{result.steps:06d}"


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
def test_a_budget_spent_by_a_checkpoints_write_ends_the_run_there_and_a_resume_trains_no_more(
        tmp_path, char_dataset, monkeypatch):
    """The budget decides after a step's evaluation and checkpoint. Where a slow write (a busy disk) spent what was
    left, the run ends at that step, and the checkpoint it resumes from must say so: saved again with the plan that
    ended it, a resume trains no step more (a loaded host's run once went on by one)."""
    import lmlab.run.checkpoint as ckpt
    write, slowed = ckpt.save_checkpoint, []

    def slow_first(root, step, *args, **kwargs):
        if not slowed:
            slowed.append(step)
            time.sleep(load_config(root.parent / "config.toml").train.budget_seconds)  # the whole budget, spent
        return write(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_first)
    result, _ = trained(tmp_path, char_dataset, 2.0, ["train.checkpoint_interval=2", "train.eval_interval=2"])
    monkeypatch.setattr(ckpt, "save_checkpoint", write)
    last = plans_of(result.run_dir)[-1]
    assert result.steps == slowed[0] == last.max_iters and last.reason == "last"
    again = Trainer(train_job(load_config(result.run_dir / "config.toml"), result.run_dir, "cpu", resume=True)).run()
    assert again.steps == result.steps


@pytest.mark.slow
def test_a_planned_run_resumes_with_its_budget_or_by_steps_but_not_with_another_budget(tmp_path, char_dataset):
    result, seconds = trained(tmp_path, char_dataset, 1.0)
    run = result.run_dir
    with pytest.raises(UserError, match=f"planned its {seconds:g} s budget"):
        Trainer(train_job(load_config(run / "config.toml", [f"train.budget_seconds={seconds + 4}"]), run, "cpu",
                          resume=True))
    again = Trainer(train_job(load_config(run / "config.toml"), run, "cpu", resume=True)).run()
    assert again.steps == result.steps  # nothing left to train: the plan is kept, not timed again
    more = load_config(run / "config.toml", ["train.budget_seconds=0", f"train.max_iters={result.steps + 10}"])
    assert Trainer(train_job(more, run, "cpu", resume=True)).run().steps == result.steps + 10


@pytest.mark.slow
def test_a_resumed_budgeted_run_says_how_it_goes_on_and_how_its_budget_held(tmp_path, char_dataset):
    """`lmlab train --resume` of a budgeted run killed after its first checkpoint says that it goes on by that
    checkpoint's plan (the steps left, what they need as planned, how to end elsewhere), then what the rest takes
    here; its end event holds the budget and the seconds every process took, and its last lines say how it held."""
    result, seconds = trained(tmp_path, char_dataset, 2.0, ["train.keep_checkpoints=1000"], steps=60)
    run = cut_at_first_checkpoint(result.run_dir, tmp_path / "killed")
    folder = RunDir(run).step_folders()[0]
    kept = Plan.of(json.loads((folder / "state.json").read_text())["training"]["budget"])
    step, last = int(folder.name[5:]), kept.max_iters
    done = subprocess.run([LMLAB, "train", "--resume", run], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert (f"budget {seconds:g} s: resumed at step {step} by its checkpoint's plan, by steps (this process's clock "
            f"is not the one that planned it): {last - step:,} steps left, to min_lr at step {last:,}") in said
    assert "To end elsewhere, resume it with --set train.budget_seconds=0 --set train.max_iters=N" in said
    assert re.search(rf"budget {seconds:g} s: steps take [\d,.]+ ms here \([\d,.]+ ms planned\): the \d+ left", said)
    end = RunDir(run).events()[-1]
    assert (end["event"], end["step"], end["budget_seconds"]) == ("end", last, seconds)
    assert end["budget_spent"] > kept.spent
    took = re.search(rf"budget {seconds:g} s: resumed at step {step} by its plan, the run took ([\d.]+) s", said)
    assert took and float(took[1]) == pytest.approx(end["budget_spent"], abs=0.051)


@pytest.mark.slow
@pytest.mark.parametrize("size", [[], ["--size", "auto"]], ids=["preset", "size auto"])
def test_a_budgeted_run_killed_after_its_plan_resumes_bitwise_without_timing_again(tmp_path, char_dataset, size):
    """Two continuations of the same budgeted run, killed with -9 once a checkpoint after its first steps was
    written: one straight to the end, one killed twice more on the way; both must end as one run, by the steps its
    checkpoint's plan foresaw (and a run sized by --size auto as any other: its shape is its config.toml's)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    write_fit(config, char_dataset, 30_000)
    settings = [*size, "--set", "train.checkpoint_interval=5", "--set", "train.log_interval=3",
                "--set", "train.eval_interval=25", "--set", "model.dropout=0.1", "--set", "train.keep_checkpoints=50",
                "--set", "train.threads=1"]  # bitwise: one thread in every process (lmlab.core.threads)

    def checkpoints(path, count):
        """On disk, with `latest` naming one: the checkpoint event is logged before the folder is written."""
        latest = pointer(RunDir(path).checkpoints, "latest")
        return latest is not None and len(RunDir(path).step_folders()) >= count

    seconds = 8.0
    for attempt in range(3):
        run = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([LMLAB, "train", config, "--run", run, "--device", "cpu", "--budget", f"{seconds}s",
                                 *settings], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda run=run, proc=proc: checkpoints(run, 1) or proc.poll() is not None)
        proc.kill()
        _, err = proc.communicate()
        plans = plans_of(run) if (run / "metrics.jsonl").exists() else []
        # room for the kills below (the ninth checkpoint at step 45) and steps after them: 60 steps are enough, and
        # the fewer a first try needs, the less often a busy start-up sends the test round again with twice the budget
        if proc.returncode == -9 and plans and plans[0].max_iters >= 60:
            break
        seconds = roomier(seconds, err) if proc.returncode == 2 else 2 * seconds
    assert proc.returncode == -9 and plans[0].max_iters >= 60, "three budgets in a row left too few steps to kill"
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    subprocess.run([LMLAB, "train", "--resume", straight], check=True, capture_output=True, timeout=300)
    for count in (4, 9):  # checkpoints: kills land between them, mid-interval
        proc = subprocess.Popen([LMLAB, "train", "--resume", run], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(lambda count=count, proc=proc: checkpoints(run, count) or proc.poll() is not None)
        proc.kill()
        proc.wait()
    subprocess.run([LMLAB, "train", "--resume", run], check=True, capture_output=True, timeout=300)
    assert stable_events(run) == stable_events(straight)
    # Planned by the first process alone; no continuation timed or planned again.
    events = RunDir(run).events()
    resumed = next(i for i, e in enumerate(events) if e["event"] == "resume")
    planned = [i for i, e in enumerate(events) if e["event"] == "budget"]
    assert planned and planned[-1] < resumed
    assert events[-1]["event"] == "end" and events[-1]["budget_spent"] > plans[0].spent  # every process's seconds
    sized = [e for e in RunDir(run).events() if e["event"] == "sizing"]
    assert len(sized) == bool(size) and all(RunDir(run).config().model.n_layer == e["depth"] for e in sized)
    same_weights(straight, run)


@pytest.mark.slow
def test_the_ranks_of_a_torchrun_job_decide_their_budget_together(tmp_path, char_dataset):
    """Each rank times its own start and steps; the plan is made from their mean figures, and every rank's clock
    reaches the others a step late (`Parallel.agree`), so all train and evaluate the same steps and end on the same
    one (ranks that disagreed would wait for each other's collectives until the job timed out)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    seconds = 10.0
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        job = torchrun([str(config), "--run", str(run), "--budget", f"{seconds}s", "--set",
                        "train.grad_accum_steps=2", "--set", "train.eval_interval=25"])
        said = output(job, timeout=300)
        if job.returncode == 0 and plans_of(run)[0].max_iters >= 30:
            break
        seconds = roomier(seconds, said)
    events, plans = RunDir(run).events(), plans_of(run)
    assert plans[0].reason == "planned" and plans[-1].reason == "last"
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
    """A 60 s budget with a CPU hog started 20 s in ends within 5% of 60 s, process start to exit, its LR at min_lr
    on its last step; without the hog (20 s, to keep the suite short) it ends as it did before the hog."""
    wall, run = budgeted_process(tmp_path, char_dataset, seconds, hog_at)
    events, cfg, plans = RunDir(run).events(), RunDir(run).config().train, plans_of(run)
    last = plans[-1]
    # Within 5% of the budget, and of the end's costs as the run measured them (its last evaluation, plot and exit),
    # which load that changes near the end (the hog's, and on a busy machine others') makes longer than planned.
    end = last.eval_seconds + last.finish_seconds
    assert 0.95 * seconds <= wall <= 1.05 * seconds + end, f"{wall:.1f} s for a {seconds:.1f} s budget"
    lrs = [e["lr"] for e in events if e["event"] == "train"]
    assert events[-1]["event"] == "end" and events[-1]["step"] == last.max_iters and last.reason == "last"
    assert lrs[-1] < cfg.min_lr + 0.1 * (cfg.learning_rate - cfg.min_lr)  # (logged every 10 steps)
    after = lrs[plans[0].warmup // 10:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # the LR never rose after warmup
