"""`train.budget_seconds` (`Budget`): a run that ends when its wall-clock budget does, start-up and evaluations
included, however busy the machine gets. It times its first steps, an evaluation and a checkpoint (or plans at once
where one more step of seconds would leave the budget), plans the steps that fill the budget, and plans again at
evaluations and whenever the pace says the end would miss; each plan lays the rest of the LR decay over the steps
that now fit, so the LR never jumps and still ends at min_lr. A resumed run goes by its checkpoint's plan and plans
no more: timing another process's steps would make resume inexact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.analysis.plots import pyplot
from lmlab.core.config import TrainConfig
from lmlab.core.errors import UserError
from lmlab.train.distributed import Parallel
from lmlab.train.planning import BudgetPlan, Measured, drifted, ended_by_start_up, make_plan
from lmlab.train.schedule import Schedule, lr_at_position, position_of

SKIP_STEPS = 2  # the first steps build kernels (or compile): not timed
# The checkpoint, evaluation and end are timed after the first step (its kernels built), so that the check after the
# next one can end a run whose steps take seconds (`last_call`) before it trains a step the budget has no room for.
COSTS_STEP = 1
MIN_TIMED_STEPS = 10
TIMED_SHARE = 0.03  # of the budget spent timing steps (at least MIN_TIMED_STEPS of them), at most MAX_TIMED_SECONDS
# Steps of seconds each: as many as fill this many times the timing's share are pace enough for the first plan, where
# waiting for MIN_TIMED_STEPS of them would spend the budget (6 steps of a 60 s budget took 90 s).
SLOW_TIMING = 3.0
MAX_TIMED_SECONDS = 60.0
CHECK_SHARE = 0.01  # the pace is checked each time this share of the budget has gone into steps (at least 0.5 s)
MIN_CHECK_SECONDS = 0.5
# The pace is the mean step over the newest steps that fill this share of the budget (at least 2 s, at least 8
# steps): a step of a busy machine can take 30 times its neighbours, and one such step is no pace.
PACE_SHARE = 0.03
MIN_PACE_SECONDS = 2.0
MIN_PACE_STEPS = 8
# An evaluation is timed again (one batch a split) when the pace has moved this much from the one it was timed at:
# under load a training step slows more than an evaluation's forward passes, so scaling one by the other misleads.
RETIME_RATIO = 1.5
# The process's exit after the end's plot (torch's and Python's teardown), which a budget counts: measured ~0.2 s.
EXIT_SECONDS = 0.3


class BudgetClock:
    """A budgeted run's clock in the process that plans it: the seconds spent (since `started`, a
    `time.perf_counter()` reading of the process's start, plus what earlier processes of the run trained), its
    timed steps (the pace is the mean of the newest), and what an evaluation, a checkpoint and the end took. An
    evaluation's cost scales with the pace (both are the model's matmuls on the same cores: load slows them alike);
    a checkpoint and the end (a write, a plot, the exit) mostly wait on one thread and the disk, and stay as timed."""

    def __init__(self, seconds: float, started: float, spent_before: float, first_step: int):
        self.seconds, self.started, self.spent_before = seconds, started, spent_before
        self.costs_step = first_step + COSTS_STEP
        self.warm_step = first_step + SKIP_STEPS  # the steps after it are timed
        self.recent: list[float] = []  # seconds of each timed step (evaluations left out), newest last
        self.untimed: list[float] = []  # seconds of the steps before them: the pace until one is timed
        self.since_check = 0.0  # seconds of steps since the last plan or check
        self.pace = 0.0  # seconds per step at the newest plan or check
        # (seconds, pace then) of an evaluation's batch (one a split), a checkpoint and the end
        self.costs = {"eval": (0.0, 0.0), "checkpoint": (0.0, 0.0), "finish": (0.0, 0.0)}
        self.plot_seconds = 0.0  # a redraw of loss.png, part of every evaluation
        self.planned = False

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def add_step(self, step: int, seconds: float) -> None:
        if step <= self.warm_step:
            self.untimed.append(seconds)
        else:
            self.recent.append(seconds)
            self.since_check += seconds
            if len(self.recent) > 200_000:  # a long run's: the pace needs only the newest
                del self.recent[:100_000]

    def due(self) -> bool:
        """Whether to plan now: the first plan once enough steps are timed (a few percent of the budget, and at
        least MIN_TIMED_STEPS or as many as fill SLOW_TIMING times that), or sooner where one more step and the
        smallest end (`last_call`) would leave the budget, or once it is gone; then a check of the pace each
        CHECK_SHARE of the budget."""
        if self.spent() >= self.seconds:
            return True
        if not self.planned:
            wanted = min(MAX_TIMED_SECONDS, TIMED_SHARE * self.seconds)
            enough = len(self.recent) >= MIN_TIMED_STEPS or self.since_check >= SLOW_TIMING * wanted
            return bool(self.recent) and self.since_check >= wanted and enough or self.last_call()
        return self.since_check >= max(MIN_CHECK_SECONDS, CHECK_SHARE * self.seconds)

    def last_call(self) -> bool:
        """Whether, before the first plan, one more step at the pace so far and an end of one evaluation batch a
        split, a checkpoint and the exit would end past the budget: steps of seconds each leave no time to wait for
        timed ones (a 60 s budget of 13 s steps had none left when the first was timed and ended at 76 s). Known
        once the costs are timed (`COSTS_STEP`)."""
        if not self.costs["finish"][0]:
            return False
        end = sum(seconds for seconds, _ in self.costs.values()) + self.plot_seconds
        return self.spent() + (self.current_pace() or self.untimed_pace()) + end >= self.seconds

    def untimed_pace(self) -> float:
        """The mean of the steps before the timed ones (slow: they include building kernels), all a `last_call` has."""
        return sum(self.untimed) / len(self.untimed) if self.untimed else 0.0

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
        """What an evaluation's batch, a checkpoint or the end (`cost`) took just now, at the current pace (the pace
        of the steps after it, when none is known yet: those before the first plan)."""
        self.costs[cost] = seconds, self.current_pace()

    def eval_stale(self, pace: float) -> bool:
        """Whether the evaluation was timed at a pace too far from `pace` for its cost to carry over."""
        then = self.costs["eval"][1]
        return bool(then and pace) and not 1 / RETIME_RATIO <= pace / then <= RETIME_RATIO

    def measured(self) -> list[float]:
        """What a plan is made of (`Measured`'s fields, as numbers every rank averages), the check restarted:
        seconds spent; per step (the pace), an evaluation's batch (scaled to it) and its plot, checkpoint and end."""
        # Before any step is timed: a last call's pace, or none where the budget is gone (it was used up before).
        self.pace = self.current_pace() or (self.untimed_pace() if self.spent() < self.seconds else 0.0)
        self.since_check = 0.0
        scaled = []
        for name, (seconds, then) in self.costs.items():
            if not then:  # timed before any step was: taken at the pace of the steps timed next
                self.costs[name] = seconds, then = seconds, self.pace
            scaled.append(seconds * self.pace / then if name == "eval" and then and self.pace else seconds)
        eval_batch, checkpoint, finish = scaled
        return [self.spent(), self.pace, eval_batch, self.plot_seconds, checkpoint, finish]


@dataclass
class Probes:
    """What a budget times besides steps, done by the training loop: a checkpoint, an evaluation of one batch a
    split, and a redraw of loss.png."""

    checkpoint: Callable[[], None]
    evaluate: Callable[[], None]
    plot: Callable[[], None]


class Budget:
    """`train.budget_seconds` as the training loop holds it: the newest plan (restored on resume), laid over the
    schedule; and, in the process that plans it, its clock: the steps, an evaluation, a checkpoint and the end
    timed, a plan made once they are and made again at evaluations and pace checks. Every rank plans from the same
    mean figures. `announce` records each plan (config.toml, the `budget` event) with the line to print, if any."""

    def __init__(self, seconds: float, schedule: Schedule, parallel: Parallel, device: torch.device,
                 intervals: tuple[int, int], probes: Probes, announce: Callable[[BudgetPlan, str | None], None]):
        self.plan = BudgetPlan(seconds)
        self.schedule, self.parallel, self.device = schedule, parallel, device
        self.intervals, self.probes, self.announce = intervals, probes, announce  # eval and checkpoint steps
        self.clock: BudgetClock | None = None  # while this process plans
        self._lay()

    def _lay(self) -> None:
        """The schedule follows the plan: its steps, warmup and decay, and its evaluations' batches."""
        if self.plan.seconds:
            self.schedule.follow_plan(self.plan.max_iters, self.plan.decay(), self.plan.fixed, self.plan.ramp())
            if self.plan.eval_iters:
                self.schedule.train = dataclasses.replace(self.schedule.train, eval_iters=self.plan.eval_iters)

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.plan.load_state_dict(state or BudgetPlan().state_dict())
        self._lay()

    def resume(self, new: TrainConfig, step: int, run: Path) -> str | None:
        """Go on at `step` under `new`: a plan once made is the run's (another budget would need steps it has not
        timed), one still to make is made afresh, with the LR held where the run had it until then; no budget trains
        on by steps (`Schedule.resume_with`). The line that says what happens to the schedule, if anything."""
        old_lr, asked, saved = self.schedule.unscaled_lr(step), new.budget_seconds, self.plan
        if asked and saved.fixed and asked != saved.seconds:
            raise UserError(f"{run} planned its {saved.seconds:g} s budget as {saved.max_iters} steps; resume it with "
                            "that budget, or with train.budget_seconds=0 and train.max_iters to train on by steps.")
        self.plan = saved if asked and saved.fixed else BudgetPlan(asked)
        line = self.schedule.resume_with(new, step, old_lr)
        if not asked or self.plan.fixed:
            self._lay()
            return line
        self.plan.position = 0.0 if step < new.warmup_iters else position_of(old_lr, new)
        self._lay()
        if not self.plan.position:
            return None
        return (f"schedule re-laid from step {step}: lr {lr_at_position(self.plan.position, new):.1e}, held until the "
                f"budget's first plan decays it to {new.min_lr:.1e} at its end")

    @property
    def ended_by_start_up(self) -> bool:
        return self.plan.reason == "start-up"

    @property
    def end_known(self) -> bool:
        """Whether the last step is known: not while a budget's first steps are being timed."""
        return self.clock is None or self.clock.planned

    def start(self, started: float | None, spent_before: float, step: int) -> None:
        """Start the clock of a budget this process plans (a new run's, or one resumed before its first plan), from
        `started` (a time.perf_counter() reading; None: now); a budget gone before the first step ends the run."""
        if not self.plan.seconds or self.plan.fixed:
            return
        pyplot()  # imported now, so that no timed evaluation includes the one-time import
        self.clock = clock = BudgetClock(self.plan.seconds, started or time.perf_counter(), spent_before, step)
        spent = self.parallel.mean([clock.spent()], self.device)[0]
        if spent >= clock.seconds:
            clock.planned = True
            self._fix(ended_by_start_up(clock.seconds, spent, step))

    def due(self) -> bool:
        return self.clock is not None and self.clock.due()

    def spent(self) -> float | None:
        """Seconds from the process's start, of a budget this process planned."""
        return None if self.clock is None else round(self.clock.spent(), 3)

    def step_timed(self, step: int, seconds: float) -> None:
        """A step's time, for the pace; after the first step, before the first plan, the costs besides steps timed."""
        if self.clock is not None:
            self.clock.add_step(step, seconds)
            if step == self.clock.costs_step and not self.clock.planned:
                self._time_costs()

    def checkpointed(self, seconds: float) -> None:
        if self.clock is not None and self.clock.planned:
            self.clock.took("checkpoint", seconds)

    def evaluated(self, step: int, seconds: float) -> None:
        """An evaluation's time (its batches, the log line and the plot); the plan made again from it, unless it was
        the plan's last step."""
        if self.clock is not None and self.clock.planned and step < self.schedule.last_step:
            batches = self.schedule.train.eval_iters
            self.clock.took("eval", max(0.0, seconds - self.clock.plot_seconds) / batches)
            self.replan(step, "evaluation")

    def replan(self, step: int, reason: str) -> None:
        """Plan, or plan again, from the time left at the recent pace: the first plan once the steps are timed or the
        budget is gone; then at every evaluation, and at a check of the pace when the end it foresees has drifted
        from the budget."""
        clock = self.clock
        measured = Measured(*self.parallel.mean(clock.measured(), self.device))
        if clock.planned and self.parallel.any(clock.eval_stale(measured.pace)):
            self._time_eval()  # under the load of now, not the pace's guess of it
            measured = Measured(*self.parallel.mean(clock.measured(), self.device))
        if not clock.planned:
            clock.planned, reason = True, "out of time" if measured.spent >= clock.seconds else "planned"
        elif reason == "pace" and measured.spent < clock.seconds and not drifted(self.plan, step, measured,
                                                                                   self.intervals):
            return
        train = self.schedule.train
        share_now = self.schedule.unscaled_lr(step - 1) / train.learning_rate if step else 0.0
        self._fix(make_plan(self.plan, step, measured, train, self.intervals, reason, share_now))

    def _time_costs(self) -> None:
        """What the plan counts besides steps: a checkpoint, an evaluation (a batch per split, after one that pays the
        evaluation's one-time costs) with the plot it redraws, and the end (a plot, and the process's exit). On a CPU,
        where evaluations run eager (`TrainStep.scoring`), a first evaluation that took a share of the budget paid
        no compile worth timing again: it stands (a 13 s step's took 5 s)."""
        clock, began = self.clock, time.perf_counter()
        self.probes.checkpoint()
        clock.took("checkpoint", time.perf_counter() - began)
        began = time.perf_counter()
        self.probes.evaluate()
        first = time.perf_counter() - began
        began = time.perf_counter()
        self.probes.plot()
        clock.plot_seconds = time.perf_counter() - began
        clock.took("finish", clock.plot_seconds + EXIT_SECONDS)
        if self.device.type == "cpu" and first >= TIMED_SHARE * clock.seconds:
            clock.took("eval", first)
        else:
            self._time_eval()

    def _time_eval(self) -> None:
        """An evaluation's cost at the load of now: a batch a split."""
        began = time.perf_counter()
        self.probes.evaluate()
        self.clock.took("eval", time.perf_counter() - began)

    def _fix(self, plan: BudgetPlan) -> None:
        """Lay the run over the plan and record it, with its line where it is worth one (`BudgetPlan.said`)."""
        before, self.plan = self.plan, plan
        train = self.schedule.train  # the config's, before the plan's evaluations are laid over it
        self._lay()
        self.announce(plan, plan.describe(before, train, self.intervals) if plan.said(before) else None)
