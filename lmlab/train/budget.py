"""`train.budget_seconds`: a run that fills a wall-clock budget, start-up, evaluations and checkpoints included.

After SKIP_STEPS steps the run times a checkpoint and an evaluation, then its steps for a few percent of the
budget, and fixes `max_iters`: the most steps whose training, evaluations and checkpoints end at the budget. The
LR schedule (cosine or WSD) is laid over those steps; before they are known it warms up and holds the peak. The
plan goes into every later checkpoint, so a resumed run trains to the same step without timing anything again;
a run resumed from before its plan times its steps anew.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import TrainConfig
from lmlab.errors import UserError
from lmlab.train.state import Saved

SKIP_STEPS = 2  # the first steps build kernels (or compile): not timed; then a timed checkpoint
MIN_TIMED_STEPS = 10
TIMED_SHARE = 0.03  # of the budget spent timing steps (at least MIN_TIMED_STEPS of them), at most MAX_TIMED_SECONDS
MAX_TIMED_SECONDS = 60.0
UNPLANNED = 10**9  # max_iters before the plan: the loop runs on and the schedule holds its peak after warmup


@dataclass
class BudgetPlan(Saved):
    """How a budget was spent, fixed once (`max_iters` > 0) and restored on resume."""

    seconds: float = 0.0  # the budget
    max_iters: int = 0  # the steps that fill it; 0 until fixed
    step: int = 0  # the step at which it was fixed
    spent: float = 0.0  # seconds of the budget gone by then, start-up included
    step_seconds: float = 0.0  # measured: one optimizer step (log lines included)
    eval_seconds: float = 0.0  # measured: one evaluation with its log line and plot
    checkpoint_seconds: float = 0.0  # measured: one checkpoint

    @property
    def fixed(self) -> bool:
        return self.max_iters > 0

    def describe(self) -> str:
        ends = "" if self.max_iters > self.step else ": nothing is left, the run ends here"
        return (f"budget {self.seconds:g} s: {self.max_iters} steps ({1000 * self.step_seconds:.1f} ms each, "
                f"evaluation {self.eval_seconds:.2f} s, checkpoint {self.checkpoint_seconds:.2f} s), "
                f"fixed at step {self.step} with {self.spent:.1f} s gone{ends}")


def resumed_plan(saved: BudgetPlan, asked: float, run: Path) -> BudgetPlan:
    """The plan a resumed run goes by: its own once fixed (another budget would need steps it has not timed), a
    fresh one while still to plan, none when resumed with train.budget_seconds = 0 (it trains on by max_iters)."""
    if asked and saved.fixed and asked != saved.seconds:
        raise UserError(f"{run} planned its {saved.seconds:g} s budget as {saved.max_iters} steps; resume it with "
                        "that budget, or with train.budget_seconds=0 and train.max_iters to train on by steps.")
    return saved if asked and saved.fixed else BudgetPlan(asked)


def schedule_for(train: TrainConfig, plan: BudgetPlan) -> TrainConfig:
    """The TrainConfig the loop steps by: max_iters is the plan's, or UNPLANNED until the plan is fixed."""
    if not train.budget_seconds:
        return train
    return dataclasses.replace(train, max_iters=plan.max_iters if plan.fixed else UNPLANNED)


def count_multiples(interval: int, after: int, upto: int) -> int:
    """Multiples of `interval` in (after, upto]."""
    return upto // interval - after // interval


def seconds_needed(step: int, steps: int, plan: BudgetPlan, eval_interval: int, checkpoint_interval: int) -> float:
    """Seconds to train from `step` to `step + steps`: the steps, an evaluation (with the checkpoint of its new
    best, as the evaluations of a short run mostly are) at every multiple of eval_interval and at the last step,
    and a checkpoint at every other multiple of checkpoint_interval."""
    if not steps:
        return 0.0
    end = step + steps
    last_apart = end % eval_interval != 0  # the last step is evaluated even off the interval
    evals = count_multiples(eval_interval, step, end) + last_apart
    checkpoints_apart = (count_multiples(checkpoint_interval, step, end)
                         - count_multiples(math.lcm(eval_interval, checkpoint_interval), step, end)
                         - (last_apart and end % checkpoint_interval == 0))
    return (steps * plan.step_seconds + evals * (plan.eval_seconds + plan.checkpoint_seconds)
            + checkpoints_apart * plan.checkpoint_seconds)


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
    """A budgeted run on its way to a plan: the seconds it has spent (since `started`, a `time.perf_counter()`
    reading from this process's start, plus what earlier processes of the run trained) and its timed steps."""

    def __init__(self, seconds: float, started: float, spent_before: float, first_step: int):
        self.seconds, self.started, self.spent_before = seconds, started, spent_before
        self.warm_step = first_step + SKIP_STEPS  # the eval and checkpoint are timed here; later steps are timed
        self.step_total, self.steps = 0.0, 0  # seconds in the steps timed so far (evaluations left out)
        self.eval_seconds = self.checkpoint_seconds = 0.0

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def add_step(self, step: int, seconds: float) -> None:
        if step > self.warm_step:
            self.step_total, self.steps = self.step_total + seconds, self.steps + 1

    def timing_done(self) -> bool:
        """Whether enough steps have been timed to fix the plan."""
        wanted = min(MAX_TIMED_SECONDS, TIMED_SHARE * self.seconds)
        return self.steps >= MIN_TIMED_STEPS and self.step_total >= wanted

    def measured(self) -> list[float]:
        """What a plan is made of: seconds spent, per step, per evaluation, per checkpoint."""
        return [self.spent(), self.step_total / self.steps, self.eval_seconds, self.checkpoint_seconds]


def make_plan(seconds: float, step: int, measured: list[float], train: TrainConfig) -> BudgetPlan:
    """Fix max_iters at `step`: `step` plus the steps that fit in what is left of the budget, by the
    `BudgetClock.measured` figures."""
    plan = BudgetPlan(seconds, 0, step, *measured)
    plan.max_iters = step + steps_that_fit(seconds - plan.spent, step, plan, train.eval_interval,
                                           train.checkpoint_interval)
    return plan
