"""`train.budget_seconds`: a run that ends when its wall-clock budget does, counted from the process's start, with
start-up, evaluations, checkpoints and the end included, however busy the machine gets meanwhile.

After SKIP_STEPS steps the run times a checkpoint and an evaluation, then its steps for a few percent of the
budget, and plans: `max_iters` is the most steps whose training, evaluations and checkpoints end at the budget.
Then it steers: at every evaluation, and whenever the pace of its steps says the end would miss the budget, it
plans again from the time actually left at the pace of its recent steps (the evaluation's and checkpoint's costs
scaled with it: a busier machine slows them alike). Each plan lays the rest of the LR schedule over the steps that
now fit, continuing from where the schedule stands, so the LR never jumps and still ends decayed.

Every plan is a `budget` event in metrics.jsonl and is kept by every later checkpoint. A resumed run goes by the plan
of its checkpoint and plans no more (the budget was its first process's; steering from another process's timing
would make resume inexact), so it trains to the same step, bitwise as if it had not stopped. A run resumed before
its first plan times its steps anew.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.core.config import TrainConfig
from lmlab.core.errors import UserError
from lmlab.train.optim import lr_at, lr_at_position, position_between
from lmlab.train.state import Saved

SKIP_STEPS = 2  # the first steps build kernels (or compile): not timed; then a timed checkpoint
MIN_TIMED_STEPS = 10
TIMED_SHARE = 0.03  # of the budget spent timing steps (at least MIN_TIMED_STEPS of them), at most MAX_TIMED_SECONDS
MAX_TIMED_SECONDS = 60.0
UNPLANNED = 10**9  # max_iters before the plan: the loop runs on and the schedule holds its peak after warmup
CHECK_SHARE = 0.01  # the pace is checked each time this share of the budget has gone into steps (at least 0.5 s)
MIN_CHECK_SECONDS = 0.5
# The pace is the mean step over the newest steps that fill this share of the budget (at least 2 s, at least 8
# steps): a step of a busy machine can take 30 times its neighbours, and one such step is no pace.
PACE_SHARE = 0.03
MIN_PACE_SECONDS = 2.0
MIN_PACE_STEPS = 8
# A check plans again when the end it foresees misses the budget by more than this share of the budget (or of the
# time left, early on, when the pace has the most time to change, or two steps).
DRIFT_SHARE = 0.01
DRIFT_LEFT_SHARE = 0.05
# An evaluation is timed again (one batch a split) when the pace has moved this much from the one it was timed at:
# under load a training step slows more than an evaluation's forward passes, so scaling one by the other misleads.
RETIME_RATIO = 1.5


@dataclass
class BudgetPlan(Saved):
    """How a budget is being spent: the newest plan (`max_iters` > 0 once there is one), restored on resume."""

    seconds: float = 0.0  # the budget
    max_iters: int = 0  # the steps that fill it
    step: int = 0  # the step at which this plan was made
    spent: float = 0.0  # seconds of the budget gone by then, start-up included
    step_seconds: float = 0.0  # one optimizer step at the recent pace (log lines included)
    eval_seconds: float = 0.0  # one evaluation with its log line and plot, at that pace
    checkpoint_seconds: float = 0.0  # one checkpoint, at that pace
    finish_seconds: float = 0.0  # the end after the last checkpoint: the final plot and the process's exit
    anchor: int = 0  # the step from which the LR follows this plan
    position: float = 0.0  # where the schedule stands at `anchor`: 0 at its peak (after warmup), 1 at min_lr
    reason: str = ""  # what made it: planned, evaluation, pace, out of time, start-up; "" before any plan

    @property
    def fixed(self) -> bool:
        return bool(self.reason)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Older checkpoints' plans lack the newer fields: their defaults hold (one plan, anchored at its step)."""
        defaults = {"anchor": state.get("step", 0), "position": 0.0, "finish_seconds": 0.0,
                    "reason": "planned" if state.get("max_iters") else ""}
        super().load_state_dict({**defaults, **state})

    def position_at(self, step: int) -> float:
        """Where the schedule stands at `step`: from `position` at the anchor to 1 at the plan's last step (before any
        plan, `position`: 0, the peak after warmup, or where a resumed run's schedule stood)."""
        if not self.fixed:
            return self.position
        return position_between(step, self.anchor, self.position, self.max_iters - 1)

    def lr(self, step: int, train: TrainConfig) -> float:
        """The LR of `step` (its index, from 0): the warmup, then the schedule's shape at `position_at(step)`."""
        if step < train.warmup_iters:
            return lr_at(step, train)
        return lr_at_position(self.position_at(step), train)

    def describe(self, before: BudgetPlan | None = None) -> str:
        """The plan in a sentence: the first one, a new one against `before`, or the end it calls."""
        if self.reason == "start-up":
            return (f"budget {self.seconds:g} s: start-up alone took {self.spent:.1f} s, so no step fits; the run ends "
                    "before its first step, with a checkpoint of its initial weights (a budget must hold start-up, "
                    "steps and an evaluation).")
        pace = f"{1000 * self.step_seconds:.1f} ms a step"
        if self.max_iters <= self.step and not self.step_seconds:
            return (f"budget {self.seconds:g} s: used up at step {self.step} ({self.spent:.1f} s), before its steps "
                    "could be timed: the run ends here, with its evaluation and checkpoint.")
        if self.max_iters <= self.step:
            return (f"budget {self.seconds:g} s: {max(0.0, self.seconds - self.spent):.1f} s left at step {self.step}, "
                    f"less than one more step ({pace}) with the final evaluation ({self.eval_seconds:.2f} s) and "
                    f"checkpoint: the run ends here, with them.")
        if before is None or not before.fixed:
            return (f"budget {self.seconds:g} s: {self.max_iters} steps ({pace}, evaluation {self.eval_seconds:.2f} s, "
                    f"checkpoint {self.checkpoint_seconds:.2f} s), planned at step {self.step} with "
                    f"{self.spent:.1f} s gone")
        return (f"budget {self.seconds:g} s: {self.max_iters} steps, was {before.max_iters} (planned again at step "
                f"{self.step}, {self.reason}: {pace}, was {1000 * before.step_seconds:.1f}; "
                f"{self.seconds - self.spent:.1f} s left)")


def resumed_plan(saved: BudgetPlan, asked: float, run: Path) -> BudgetPlan:
    """The plan a resumed run goes by: its own once made (another budget would need steps it has not timed), a
    fresh one while still to plan, none when resumed with train.budget_seconds = 0 (it trains on by max_iters)."""
    if asked and saved.fixed and asked != saved.seconds:
        raise UserError(f"{run} planned its {saved.seconds:g} s budget as {saved.max_iters} steps; resume it with "
                        "that budget, or with train.budget_seconds=0 and train.max_iters to train on by steps.")
    return saved if asked and saved.fixed else BudgetPlan(asked)


def schedule_for(train: TrainConfig, plan: BudgetPlan) -> TrainConfig:
    """The TrainConfig the loop steps by: max_iters is the plan's, or UNPLANNED until there is a plan (a plan of no
    steps at all, start-up having taken the budget, ends the loop by its reason)."""
    if not train.budget_seconds:
        return train
    return dataclasses.replace(train, max_iters=max(1, plan.max_iters) if plan.fixed else UNPLANNED)


def count_multiples(interval: int, after: int, upto: int) -> int:
    """Multiples of `interval` in (after, upto]."""
    return upto // interval - after // interval


def seconds_needed(step: int, steps: int, plan: BudgetPlan, eval_interval: int, checkpoint_interval: int) -> float:
    """Seconds to train from `step` to `step + steps` and end: the steps, an evaluation (with the checkpoint of its
    new best, as the evaluations of a short run mostly are) at every multiple of eval_interval and at the last step,
    a checkpoint at every other multiple of checkpoint_interval, and the end's plot and exit."""
    if not steps:
        return 0.0
    end = step + steps
    last_apart = end % eval_interval != 0  # the last step is evaluated even off the interval
    evals = count_multiples(eval_interval, step, end) + last_apart
    checkpoints_apart = (count_multiples(checkpoint_interval, step, end)
                         - count_multiples(math.lcm(eval_interval, checkpoint_interval), step, end)
                         - (last_apart and end % checkpoint_interval == 0))
    return (steps * plan.step_seconds + evals * (plan.eval_seconds + plan.checkpoint_seconds)
            + checkpoints_apart * plan.checkpoint_seconds + plan.finish_seconds)


def steps_that_fit(seconds: float, step: int, plan: BudgetPlan, eval_interval: int, checkpoint_interval: int) -> int:
    """The most steps after `step` that `seconds_needed` fits in `seconds` (0 if not even one)."""
    low, high = 0, 1
    while seconds_needed(step, high, plan, eval_interval, checkpoint_interval) <= seconds:
        low, high = high, high * 2
    while high - low > 1:  # seconds_needed grows with the steps: bisect between a fit and a miss
        mid = (low + high) // 2
        if seconds_needed(step, mid, plan, eval_interval, checkpoint_interval) <= seconds:
            low = mid
        else:
            high = mid
    return low


class BudgetClock:
    """A budgeted run's clock in the process that plans it: the seconds spent (since `started`, a
    `time.perf_counter()` reading of the process's start, plus what earlier processes of the run trained), its
    timed steps (the pace is the mean of the newest), and what an evaluation, a checkpoint and the end took. An
    evaluation's cost scales with the pace (both are the model's matmuls on the same cores: load slows them alike);
    a checkpoint and the end (a write, a plot, the exit) mostly wait on one thread and the disk, and stay as timed."""

    def __init__(self, seconds: float, started: float, spent_before: float, first_step: int):
        self.seconds, self.started, self.spent_before = seconds, started, spent_before
        self.warm_step = first_step + SKIP_STEPS  # the eval and checkpoint are timed here; later steps are timed
        self.recent: list[float] = []  # seconds of each timed step (evaluations left out), newest last
        self.since_check = 0.0  # seconds of steps since the last plan or check
        self.pace = 0.0  # seconds per step at the newest plan or check
        self.costs = {"eval": (0.0, 0.0), "checkpoint": (0.0, 0.0), "finish": (0.0, 0.0)}  # (seconds, pace then)
        self.plot_seconds = 0.0  # a redraw of loss.png, part of every evaluation
        self.planned = False

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def add_step(self, step: int, seconds: float) -> None:
        if step > self.warm_step:
            self.recent.append(seconds)
            self.since_check += seconds
            if len(self.recent) > 200_000:  # a long run's: the pace needs only the newest
                del self.recent[:100_000]

    def due(self) -> bool:
        """Whether to plan now: the first plan once enough steps are timed (a few percent of the budget, at least
        MIN_TIMED_STEPS) or the budget is gone; then a check of the pace each CHECK_SHARE of the budget."""
        if self.spent() >= self.seconds:
            return True
        if not self.planned:
            wanted = min(MAX_TIMED_SECONDS, TIMED_SHARE * self.seconds)
            return len(self.recent) >= MIN_TIMED_STEPS and self.since_check >= wanted
        return self.since_check >= max(MIN_CHECK_SECONDS, CHECK_SHARE * self.seconds)

    def current_pace(self) -> float:
        """The mean of the newest steps that fill PACE_SHARE of the budget (all of them before the first plan)."""
        window = max(MIN_PACE_SECONDS, PACE_SHARE * self.seconds) if self.planned else math.inf
        total, count = 0.0, 0
        for seconds in reversed(self.recent):
            total, count = total + seconds, count + 1
            if total >= window and count >= MIN_PACE_STEPS:
                break
        return total / count if count else self.pace

    def took(self, cost: str, seconds: float) -> None:
        """What an evaluation, a checkpoint or the end (`cost`) took just now, at the current pace (the pace of the
        steps after it, when none is known yet: those before the first plan)."""
        self.costs[cost] = seconds, self.current_pace()

    def eval_stale(self, pace: float) -> bool:
        """Whether the evaluation was timed at a pace too far from `pace` for its cost to carry over."""
        then = self.costs["eval"][1]
        return bool(then and pace) and not 1 / RETIME_RATIO <= pace / then <= RETIME_RATIO

    def measured(self) -> list[float]:
        """What a plan is made of, the check restarted: seconds spent; per step (the pace), evaluation (scaled to
        it), checkpoint and end."""
        self.pace, self.since_check = self.current_pace(), 0.0
        scaled = []
        for name, (seconds, then) in self.costs.items():
            if not then:  # timed before any step was: taken at the pace of the steps timed next
                self.costs[name] = seconds, then = seconds, self.pace
            scaled.append(seconds * self.pace / then if name == "eval" and then and self.pace else seconds)
        return [self.spent(), self.pace, *scaled]


def make_plan(before: BudgetPlan, step: int, measured: list[float], train: TrainConfig, reason: str) -> BudgetPlan:
    """The plan at `step` from the `BudgetClock.measured` figures: `step` plus the steps whose end is nearest what is
    left of the budget (none when nothing was timed yet), the LR schedule continuing from where `before` has it at
    the new anchor."""
    plan = BudgetPlan(before.seconds, 0, step, *measured, reason=reason)
    left, intervals = plan.seconds - plan.spent, (train.eval_interval, train.checkpoint_interval)
    steps = steps_that_fit(left, step, plan, *intervals) if plan.step_seconds > 0 and left > 0 else 0
    # The end nearest the budget, one step over it or not: a budget is missed either way, by less this way.
    if steps and seconds_needed(step, steps + 1, plan, *intervals) - left < left - seconds_needed(step, steps, plan,
                                                                                               *intervals):
        steps += 1
    plan.max_iters = step + steps
    plan.anchor = max(step, train.warmup_iters)
    plan.position = before.position_at(plan.anchor)
    return plan


def drifted(plan: BudgetPlan, step: int, measured: list[float], train: TrainConfig) -> bool:
    """Whether the end `plan` foresees, at the pace `measured` now, misses the budget by more than it tolerates
    (DRIFT_SHARE, DRIFT_LEFT_SHARE)."""
    now = BudgetPlan(plan.seconds, plan.max_iters, step, *measured)
    foreseen = now.spent + seconds_needed(step, max(0, plan.max_iters - step), now, train.eval_interval,
                                          train.checkpoint_interval)
    left = plan.seconds - now.spent
    return abs(foreseen - plan.seconds) > max(DRIFT_SHARE * plan.seconds, DRIFT_LEFT_SHARE * left,
                                              2 * now.step_seconds)


def ended_by_start_up(seconds: float, spent: float, step: int) -> BudgetPlan:
    """The plan of a budget gone before the first step of this process: it ends where it stands."""
    return BudgetPlan(seconds, step, step, spent, reason="start-up", anchor=step, position=1.0)
