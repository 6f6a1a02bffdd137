"""The training loop's part of `train.budget_seconds` (lmlab/train/budget.py has the arithmetic): timing the first
steps, an evaluation and a checkpoint, planning and planning again as the run goes, and laying the run over each
plan. A mixin of `Trainer`, whose state (progress, config, schedule, run folder, ranks) it reads and sets."""

from __future__ import annotations

import dataclasses
import time

from lmlab.analysis.plots import plot_losses, pyplot
from lmlab.train.budget import BudgetClock, BudgetPlan, drifted, ended_by_start_up, make_plan, schedule_for

# The process's exit after the end's plot (torch's and Python's teardown), which a budget counts: measured ~0.2 s.
EXIT_SECONDS = 0.3


class Steering:
    """What `Trainer` does for a budget: `_steering` (the clock of a budget this process plans), `_stepped` (a
    step timed; the threads look at it too), `_timed_checkpoint`, `_evaluated` (an evaluation, and a plan from it),
    `_steer` (plan now), `_time_costs`, `_time_eval`, `_fix_plan`, and `_bar_total` (none while the first steps are
    timed)."""

    def _steering(self) -> BudgetClock | None:
        """The clock of a budget this process plans (a new run's, or one resumed before its first plan); a budget
        gone before the first step (start-up took it) ends the run where it stands."""
        if not self.budget.seconds or self.budget.fixed:
            return None
        pyplot()  # imported now, so that no timed eval includes the one-time import
        clock = BudgetClock(self.budget.seconds, self.started or time.perf_counter(), self.clock.before,
                            self.progress.step)
        spent = self.parallel.mean([clock.spent()], self.device)[0]
        if spent >= clock.seconds:
            clock.planned = True
            self._fix_plan(ended_by_start_up(clock.seconds, spent, self.progress.step))
        return clock

    def _bar_total(self, clock: BudgetClock | None) -> int | None:
        """The progress bar's total: the schedule's steps, unknown while a budget's first steps are being timed."""
        return self.schedule.max_iters if clock is None or clock.planned else None

    def _stepped(self, clock: BudgetClock | None, seconds: float) -> None:
        """A step's time, for the threads' look at the load and pace (lmlab.core.threads) and the pace of a budget
        this process steers; at its warm step, before the first plan, what the plan counts besides steps is
        timed."""
        changed = self.threads.stepped(seconds)
        if changed:
            self._threads_changed(changed)
        if clock is None:
            return
        clock.add_step(self.progress.step, seconds)
        if self.progress.step == clock.warm_step and not clock.planned:
            self._time_costs(clock)

    def _timed_checkpoint(self, best: bool, clock: BudgetClock | None) -> None:
        """A checkpoint; a budget this process steers (once planned) keeps how long it took."""
        began = time.perf_counter()
        self._checkpoint(best)
        if clock is not None and clock.planned:
            clock.took("checkpoint", time.perf_counter() - began)

    def _evaluated(self, steering: BudgetClock | None) -> bool:
        """Evaluate, log it, and whether it is a new best; a budget this process steers plans again from it, unless
        it is the plan's last step."""
        began = time.perf_counter()
        train_eval, val = self._evaluate()
        best = self._after_eval(train_eval, val, time.perf_counter() - began)
        if steering is not None and steering.planned and self.progress.step < self.schedule.max_iters:
            steering.took("eval", time.perf_counter() - began)
            self._steer(steering, "evaluation")
        return best

    def _steer(self, clock: BudgetClock, reason: str) -> None:
        """Plan, or plan again, from the time left at the recent pace (every rank from the same mean figures): the
        first plan once the steps are timed or the budget is gone; then at every evaluation, and at a check of the
        pace when the end it foresees has drifted from the budget."""
        step = self.progress.step
        measured = self.parallel.mean(clock.measured(), self.device)
        if clock.planned and self.parallel.any(clock.eval_stale(measured[1])):
            self._time_eval(clock)  # under the load of now, not the pace's guess of it
            measured = self.parallel.mean(clock.measured(), self.device)
        if not clock.planned:
            clock.planned, reason = True, "out of time" if measured[0] >= clock.seconds else "planned"
        elif reason == "pace" and measured[0] < clock.seconds and not drifted(self.budget, step, measured,
                                                                                self.cfg.train):
            return
        self._fix_plan(make_plan(self.budget, step, measured, self.cfg.train, reason))

    def _time_costs(self, clock: BudgetClock) -> None:
        """What a budgeted run's plan counts besides its steps, timed: a checkpoint, an eval (of one batch per split,
        after one that pays the eval's one-time costs, scaled to eval_iters) with the plot it redraws, and the end
        (a plot, and the process's exit)."""
        began = time.perf_counter()
        self._checkpoint(best=False)
        clock.took("checkpoint", time.perf_counter() - began)
        self._evaluate(n_batches=1)
        began = time.perf_counter()
        self._write(plot_losses, self.run_dir)
        clock.plot_seconds = time.perf_counter() - began
        clock.took("finish", clock.plot_seconds + EXIT_SECONDS)
        self._time_eval(clock)

    def _time_eval(self, clock: BudgetClock) -> None:
        """An evaluation's cost at the load of now: one batch a split, scaled to eval_iters, and its plot."""
        began = time.perf_counter()
        self._evaluate(n_batches=1)
        clock.took("eval", self.cfg.train.eval_iters * (time.perf_counter() - began) + clock.plot_seconds)

    def _fix_plan(self, plan: BudgetPlan) -> None:
        """Lay the run over the plan's steps: config.toml records them, and a `budget` event the plan; said when it
        is the first, ends the run, or moves the end by a tenth or more."""
        before, self.budget = self.budget, plan
        if plan.max_iters:  # a budget gone before the first step leaves the config's (its plan ends at step 0)
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                               max_iters=plan.max_iters))
        self.schedule = schedule_for(self.cfg.train, plan)
        self._write(self.run_dir.write_config, self.cfg)
        self._log({"event": "budget", **plan.state_dict()})
        moved = abs(plan.max_iters - before.max_iters) > max(2, 0.1 * before.max_iters)
        if not before.fixed or plan.max_iters <= plan.step or moved:
            self.console.print(plan.describe(before))
