"""A time budget's plan (`BudgetPlan`): the steps that fill what is left of it, the batches each evaluation scores and
the warmup, from what the run measured; the arithmetic `make_plan` does, which the automatic size
(lmlab.experiments.sizing) does too before a run has begun. Every plan counts the evaluations (at their interval and
the last step's), the checkpoints and the end (the last plot and the process's exit)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmlab.core.config import TrainConfig
from lmlab.train.schedule import Decay, Ramp, Schedule
from lmlab.train.state import Checkpointed

# A budget's evaluations take at most this share of it: where train.eval_iters batches a split would take more, each
# scores fewer (the first of the same fixed batches), and the last one is made to fit what is left: a 60 s budget
# of 6 slow steps ended at 90 s, its final evaluation at full eval_iters taking 26 s.
EVAL_SHARE = 0.1
# A warmup longer than this share of the steps a budget plans is shortened to it (rising from where the LR stands
# when the plan is made): a run of 43 planned steps with warmup_iters = 50 ended still warming up.
WARMUP_SHARE = 0.1
# A plan made again moves the end by more than this share of the steps (or two steps) to be said.
MOVED_SHARE = 0.1
# A plan may drift from the budget by this share of it (or of the time left, early on, when the pace has the most
# time to change, or two steps) before a check of the pace plans again.
DRIFT_SHARE = 0.01
DRIFT_LEFT_SHARE = 0.05


@dataclass
class Measured:
    """What a plan is made of, as `BudgetClock.measured` has it (the mean of every rank's): seconds of the budget
    gone, the pace (seconds a step), an evaluation's seconds a batch (both splits) and its plot, a checkpoint and the
    end."""

    spent: float
    pace: float
    eval_batch: float
    plot: float
    checkpoint: float
    finish: float

    def eval_seconds(self, batches: int) -> float:
        return batches * self.eval_batch + self.plot


@dataclass
class BudgetPlan(Checkpointed):
    """How a budget is being spent: the newest plan (`max_iters` > 0 once there is one), restored on resume."""

    seconds: float = 0.0  # the budget
    max_iters: int = 0  # the steps that fill it
    step: int = 0  # the step at which this plan was made
    spent: float = 0.0  # seconds of the budget gone by then, start-up included
    step_seconds: float = 0.0  # one optimizer step at the recent pace (log lines included)
    eval_seconds: float = 0.0  # one evaluation (of `eval_iters` batches a split) with its log line and plot
    checkpoint_seconds: float = 0.0  # one checkpoint, at that pace
    finish_seconds: float = 0.0  # the end after the last checkpoint: the final plot and the process's exit
    anchor: int = 0  # the step from which the LR follows this plan
    position: float = 0.0  # where the schedule stands at `anchor`: 0 at its peak (after warmup), 1 at min_lr
    reason: str = ""  # what made it: planned, evaluation, pace, out of time, start-up; "" before any plan
    eval_iters: int = 0  # batches a split each evaluation scores under this plan (0: train.eval_iters)
    warmup: int = 0  # the step the LR reaches its peak at, where this plan shortened the warmup (0: warmup_iters)
    warmup_from: float = 0.0  # the share of the peak a shortened warmup rises from, after step `step` - 1

    @property
    def fixed(self) -> bool:
        return bool(self.reason)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Older checkpoints' plans lack the newer fields: their defaults hold (one plan, anchored at its step)."""
        defaults = {"anchor": state.get("step", 0), "position": 0.0, "finish_seconds": 0.0,
                    "reason": "planned" if state.get("max_iters") else "", "eval_iters": 0, "warmup": 0,
                    "warmup_from": 0.0}
        super().load_state_dict({**defaults, **state})

    def decay(self) -> Decay:
        """The schedule's decay under this plan: from `position` at the anchor to min_lr at its last step (before any
        plan, held at `position`: 0, the peak after warmup, or where a resumed run's schedule stood)."""
        return Decay(self.anchor, self.position, self.max_iters if self.fixed else None)

    def ramp(self) -> Ramp | None:
        """The warmup this plan (or one before it) shortened, from its step on."""
        return Ramp(self.step, self.warmup_from, self.warmup) if self.warmup else None

    def lr(self, step: int, train: TrainConfig) -> float:
        """The LR of `step` (its index, from 0) while this plan is in force: what the schedule laid over it says."""
        schedule = Schedule(train)
        schedule.follow_plan(self.max_iters, self.decay(), self.fixed, self.ramp())
        return schedule.unscaled_lr(step)

    def needed(self, steps: int, intervals: tuple[int, int]) -> float:
        return seconds_needed(self.step, steps, self, *intervals)

    def describe(self, before: BudgetPlan, train: TrainConfig, intervals: tuple[int, int]) -> str:
        """The plan in a sentence: the first one, a new one against `before`, or the end it calls; with what it
        changed of the warmup and the evaluations."""
        pace = f"{1000 * self.step_seconds:.1f} ms a step"
        if self.reason == "start-up":
            return (f"budget {self.seconds:g} s: start-up alone took {self.spent:.1f} s, so no step fits; the run ends "
                    "before its first step, with a checkpoint of its initial weights (a budget must hold start-up, "
                    "steps and an evaluation).")
        if self.max_iters <= self.step and not self.step_seconds:
            return (f"budget {self.seconds:g} s: used up at step {self.step} ({self.spent:.1f} s), before its steps "
                    "could be timed: the run ends here, with its evaluation and checkpoint.")
        if self.max_iters <= self.step:
            return (f"budget {self.seconds:g} s: {max(0.0, self.seconds - self.spent):.1f} s left at step {self.step}, "
                    f"less than one more step needs ({self.needed(1, intervals):.1f} s: {pace}, the final evaluation "
                    f"{self.eval_seconds:.2f} s, checkpoint {self.checkpoint_seconds:.2f} s, exit "
                    f"{self.finish_seconds:.2f} s): the run ends here, with them{self._changes(before, train)}.")
        if not before.fixed:
            return (f"budget {self.seconds:g} s: {self.max_iters} steps ({pace}, evaluation {self.eval_seconds:.2f} s, "
                    f"checkpoint {self.checkpoint_seconds:.2f} s), planned at step {self.step} with "
                    f"{self.spent:.1f} s gone{self._changes(before, train)}")
        return (f"budget {self.seconds:g} s: {self.max_iters} steps, was {before.max_iters} (planned again at step "
                f"{self.step}, {self.reason}: {pace}, was {1000 * before.step_seconds:.1f}; "
                f"{self.seconds - self.spent:.1f} s left){self._changes(before, train)}")

    def said(self, before: BudgetPlan) -> bool:
        """Whether the plan is worth a line: the first, one that ends the run, one that moves the end by a tenth or
        more, or changes the evaluations' batches or the warmup."""
        moved = abs(self.max_iters - before.max_iters) > max(2, MOVED_SHARE * before.max_iters)
        return (not before.fixed or self.max_iters <= self.step or moved or
                self.eval_iters != before.eval_iters or self.warmup != before.warmup)

    def _changes(self, before: BudgetPlan, train: TrainConfig) -> str:
        said = []
        if self.eval_iters and self.eval_iters < (before.eval_iters or train.eval_iters):
            said.append(f"evaluations of {self.eval_iters} batch{'es' * (self.eval_iters > 1)} a split, not "
                        f"{before.eval_iters or train.eval_iters} (train.eval_iters): at that many they would take "
                        f"more than {EVAL_SHARE:.0%} of the budget" + ("" if self.max_iters > self.step else
                                                             ", or more than is left"))
        if self.warmup and self.warmup != before.warmup and self.step < self.warmup < train.warmup_iters:
            said.append(f"the peak LR at step {self.warmup}, not at {train.warmup_iters} (train.warmup_iters, more "
                        f"than {WARMUP_SHARE:.0%} of the {self.max_iters} steps)")
        return "".join(f"; {s}" for s in said)


def count_multiples(interval: int, after: int, upto: int) -> int:
    """Multiples of `interval` in (after, upto]."""
    return upto // interval - after // interval


def evaluations(step: int, steps: int, eval_interval: int) -> int:
    """The evaluations from `step` to `step + steps`: at every multiple of eval_interval, and the last step's."""
    end = step + steps
    return count_multiples(eval_interval, step, end) + (end % eval_interval != 0 or not steps)


def seconds_needed(step: int, steps: int, plan: BudgetPlan, eval_interval: int, checkpoint_interval: int) -> float:
    """Seconds to train from `step` to `step + steps` and end: the steps, an evaluation (with the checkpoint of its
    new best, as the evaluations of a short run mostly are) at every multiple of eval_interval and at the last step,
    a checkpoint at every other multiple of checkpoint_interval, and the end's plot and exit."""
    if not steps:
        return 0.0
    end = step + steps
    last_apart = end % eval_interval != 0  # the last step is evaluated even off the interval
    evals = evaluations(step, steps, eval_interval)
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


def nearest_end(left: float, plan: BudgetPlan, intervals: tuple[int, int]) -> int:
    """The steps after plan.step whose end is nearest `left` seconds from now, one step over it or not: a budget is
    missed either way, by less this way (none when nothing was timed yet or nothing is left)."""
    if plan.step_seconds <= 0 or left <= 0:
        return 0
    steps = steps_that_fit(left, plan.step, plan, *intervals)
    if steps and plan.needed(steps + 1, intervals) - left < left - plan.needed(steps, intervals):
        steps += 1
    return steps


def planned_steps(plan: BudgetPlan, left: float, intervals: tuple[int, int], most_batches: int,
                  eval_seconds: Callable[[int], float]) -> tuple[int, int]:
    """The steps after plan.step whose end is nearest `left` seconds from now, and the batches a split each
    evaluation scores: `most_batches`, or fewer where the evaluations would take more than EVAL_SHARE of the budget
    (or the last one, where no step fits beside evaluations of that share, more than is left); `eval_seconds(batches)`
    is one evaluation's cost. Sets plan.eval_seconds to that of the batches chosen."""
    def fitting(room: float, batches: int) -> int:
        batch = eval_seconds(1) - eval_seconds(0)
        return batches if batch <= 0 else max(1, min(batches, int((room - eval_seconds(0)) / batch)))

    def steps_beside(batches: int) -> int:
        plan.eval_seconds = eval_seconds(batches)
        return nearest_end(left, plan, intervals)

    batches = most_batches
    for _ in range(4):  # fewer batches leave room for more steps, and so more evaluations: settled in a pass or two
        fewer = fitting(EVAL_SHARE * plan.seconds / evaluations(plan.step, steps_beside(batches), intervals[0]),
                        batches)
        if fewer == batches:
            break
        batches = fewer
    if steps := steps_beside(batches):
        return steps, batches
    # Only now may the end's evaluation take what is left: sized to it first, it left no room for the steps that fit
    # beside a smaller one (a 300 s budget of 13 s steps planned none in the 200 s left and evaluated 49 batches).
    batches = fitting(left - plan.checkpoint_seconds - plan.finish_seconds, most_batches)
    return steps_beside(batches), batches


def shortened_warmup(before: BudgetPlan, step: int, max_iters: int, warmup_iters: int,
                     share_now: float) -> tuple[int, float]:
    """The warmup of a plan of max_iters steps made at `step` (`plan.warmup`, `plan.warmup_from`): the config's while
    it is at most WARMUP_SHARE of the steps, else that share of them (where the run is past it already, that share
    of the steps left), rising from `share_now` of the peak, the LR of the step before."""
    end = before.warmup or warmup_iters
    if end <= step or max_iters <= step:
        return before.warmup, before.warmup_from  # warmed up already, or nothing more to train
    cap = round(WARMUP_SHARE * max_iters)
    if not before.warmup and warmup_iters <= cap:
        return 0, 0.0
    target = min(warmup_iters, cap if step < cap else step + max(1, round(WARMUP_SHARE * (max_iters - step))))
    if not before.warmup and target == warmup_iters:
        return 0, 0.0  # already where the config's own warmup ends
    return target, share_now


def make_plan(before: BudgetPlan, step: int, measured: Measured, train: TrainConfig, intervals: tuple[int, int],
              reason: str, share_now: float) -> BudgetPlan:
    """The plan at `step` from `measured`: `step` plus the steps whose end is nearest what is left of the budget,
    evaluating and checkpointing every `intervals` steps (each evaluation of at most as many batches as before), the
    warmup shortened where it is longer than the plan allows, and the LR schedule continuing from where `before`
    has it at the new anchor."""
    plan = BudgetPlan(before.seconds, 0, step, measured.spent, measured.pace, 0.0, measured.checkpoint,
                      measured.finish, reason=reason)
    most = min(train.eval_iters, before.eval_iters or train.eval_iters)
    steps, plan.eval_iters = planned_steps(plan, plan.seconds - plan.spent, intervals, most, measured.eval_seconds)
    plan.max_iters = step + steps
    plan.warmup, plan.warmup_from = shortened_warmup(before, step, plan.max_iters, train.warmup_iters, share_now)
    plan.anchor = max(step, plan.warmup or train.warmup_iters)
    plan.position = before.decay().position_at(plan.anchor)
    return plan


def drifted(plan: BudgetPlan, step: int, measured: Measured, intervals: tuple[int, int]) -> bool:
    """Whether the end `plan` foresees, at the pace `measured` now, misses the budget by more than it tolerates
    (DRIFT_SHARE, DRIFT_LEFT_SHARE)."""
    now = BudgetPlan(plan.seconds, plan.max_iters, step, measured.spent, measured.pace,
                     measured.eval_seconds(plan.eval_iters), measured.checkpoint, measured.finish)
    foreseen = now.spent + now.needed(max(0, plan.max_iters - step), intervals)
    left = plan.seconds - now.spent
    return abs(foreseen - plan.seconds) > max(DRIFT_SHARE * plan.seconds, DRIFT_LEFT_SHARE * left,
                                              2 * now.step_seconds)


def ended_by_start_up(seconds: float, spent: float, step: int) -> BudgetPlan:
    """The plan of a budget gone before the first step of this process: it ends where it stands."""
    return BudgetPlan(seconds, step, step, spent, reason="start-up", anchor=step, position=1.0)
