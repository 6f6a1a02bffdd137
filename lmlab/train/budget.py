"""A time budget (`train.budget_seconds`): the run ends when the budget does, start-up, evaluations and its end
included, however the machine's pace changes. One planner, `plan`, answers `lmlab plan --budget`, `--size auto` and the
trainer alike, from the seconds gone and what a step, an evaluation and a checkpoint cost (`Costs`), or refuses a budget
that cannot hold its minimum before any step trains.

While the run goes (`Budget`), the LR after warmup follows the budget's clock, not the step count: a change of pace
moves where the steps fall on the curve, never the curve, so the LR cannot rise and reaches min_lr when the time does. A
resumed run goes on by steps: another process's clock would make resume inexact; it says so, with what the rest takes
on the machine it resumed on, and its end says how the budget held over all its processes."""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

from lmlab.core.config import TrainConfig
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.data.shards import covered

EVAL_SHARE = 0.1  # evaluations measure the run, they do not train it: at most this share of the budget
FINAL_SHARE = 0.05  # and so does the final score of what the run keeps, at most this share besides
WARMUP_SHARE = 0.1  # a warmup longer than this share of the steps is shortened to it, leaving the rest to the decay
MIN_STEPS = 2  # the fewest a budget must hold: one step is no run (its pace unknown before it, no decay after it)
PACE_STEPS = 5  # the pace is the median of this many newest steps: blind to two outliers, following a lasting change
MOVED_SHARE = 0.1  # a foreseen end that moved by this share of the steps is logged
HELD_SHARE = 0.05  # a run ends within this share of its budget, or a resumed run says how to end sooner
BY_STEPS = "--set train.budget_seconds=0 --set train.max_iters=N"  # a resumed run's settings to go on by steps to N


@dataclass(frozen=True)
class Costs:
    """Seconds: a training step, an evaluation's batch (both splits) and what an evaluation costs besides, a checkpoint,
    and the end after the last checkpoint."""

    step: float
    eval_batch: float
    eval_fixed: float
    checkpoint: float
    finish: float

    def evaluation(self, batches: int) -> float:
        return self.eval_fixed + batches * self.eval_batch


@dataclass(frozen=True)
class Plan:
    """A budget's plan: as made before the first step, and as it stood at each later step (what a checkpoint keeps
    and a resumed run goes on by). `max_iters` is the steps foreseen (final once the run decided its last),
    `position` where the decay stood at `step` (0 the peak, 1 min_lr)."""

    seconds: float
    max_iters: int = 0
    step: int = 0
    spent: float = 0.0  # seconds of the budget gone at `step`, start-up included
    step_seconds: float = 0.0
    eval_seconds: float = 0.0  # one evaluation of `eval_iters` batches a split, with its line and plot
    checkpoint_seconds: float = 0.0
    finish_seconds: float = 0.0
    warmup: int = 0  # the step the warmup ends at: the LR's peak, unless the budget ended the run within it
    eval_iters: int = 0  # batches a split each evaluation scores
    final_windows: int = 0  # the val windows the final score covers, of the split's `val_windows`
    val_windows: int = 0
    final_seconds: float = 0.0
    position: float = 0.0
    reason: str = "planned"  # planned, pace (the foreseen end moved), last (the last step decided)

    @classmethod
    def of(cls, state: dict[str, Any]) -> Plan:
        """A plan from a checkpoint or a `budget` event (fields of older versions left out)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    def needed(self, steps: int, intervals: tuple[int, int]) -> float:
        """Seconds to train `steps` after `step` and end: the steps, an evaluation at each multiple of its interval and
        at the last step, a checkpoint at each other multiple of its interval, the final score and the end."""
        if steps <= 0:
            return 0.0
        every_eval, every_checkpoint = intervals
        end = self.step + steps
        evals = _multiples(every_eval, self.step, end) + (end % every_eval != 0)
        apart = (_multiples(every_checkpoint, self.step, end) - _multiples(math.lcm(every_eval, every_checkpoint),
                                                                            self.step, end)
                 - (end % every_eval != 0 and end % every_checkpoint == 0))
        return (steps * self.step_seconds + evals * (self.eval_seconds + self.checkpoint_seconds)
                + apart * self.checkpoint_seconds + self.final_seconds + self.finish_seconds)

    def nearest(self, left: float, intervals: tuple[int, int]) -> int:
        """The steps after `step` whose end is nearest `left` seconds away, one step over it or short of it: a
        budget is missed either way, by less this way."""
        if left <= 0 or self.step_seconds <= 0:
            return 0
        # `needed` grows with the steps, and no more of them than `left` holds of the steps alone fit
        low = bisect.bisect_right(range(min(int(left / self.step_seconds) + 2, sys.maxsize)), left,
                                  key=lambda steps: self.needed(steps, intervals)) - 1
        return low + 1 if self.needed(low + 1, intervals) - left < left - self.needed(low, intervals) else low


def position_between(step: int, anchor: int, position: float, last: int) -> float:
    """Where a decay laid linearly from `position` at step `anchor` to 1 (min_lr) at step `last` stands at `step`."""
    return 1.0 if last <= anchor else min(1.0, position + (1.0 - position) * max(0, step - anchor) / (last - anchor))


def _multiples(interval: int, after: int, upto: int) -> int:
    """Multiples of `interval` in (after, upto]."""
    return upto // interval - after // interval


class BudgetRefused(UserError):
    """A budget that cannot hold its minimum, refused before any step trains, saying what MIN_STEPS steps and their
    end need after what is `gone`; `step` says what a step takes (default: about its timed seconds here). `least`: its
    plan of MIN_STEPS steps at the least."""

    def __init__(self, seconds: float, least: Plan, intervals: tuple[int, int], step: str = "",
                 gone: str = "that start-up and timing took"):
        needed = least.spent + least.needed(MIN_STEPS, intervals)
        super().__init__(f"budget {seconds:g} s: a step takes {step or f'~{least.step_seconds:.3g} s here'}, and "
                         f"{MIN_STEPS} steps, an evaluation of one batch a split ({least.eval_seconds:.2f} s), the "
                         f"checkpoint ({least.checkpoint_seconds:.2f} s), the final score ({least.final_seconds:.2f} "
                         f"s) and the end ({least.finish_seconds:.2f} s) need {needed - least.spent:.1f} s after the "
                         f"{least.spent:.1f} s {gone}; give a budget of at least {math.ceil(needed)} s.")
        self.least = least


def final_windows(split_windows: int, batch_size: int, seconds: float, batch_seconds: float) -> int:
    """The val windows a final score covers in `seconds` at `batch_seconds` a batch: the whole split where it fits,
    else as many whole batches as do, one at least."""
    if batch_seconds <= 0:
        return split_windows
    return min(split_windows, max(1, int(seconds / batch_seconds)) * batch_size)


def final_windows_by_steps(split_windows: int, batch_size: int, block_size: int, tokens: int) -> int:
    """The val windows a run by steps scores its end on: FINAL_SHARE of its work, not of its time, so that its record
    is the same on any machine (a forward pass is about a third of a step's work a token)."""
    return final_windows(split_windows, batch_size, FINAL_SHARE * 3 * tokens, batch_size * block_size)


def plan(seconds: float, spent: float, costs: Costs, train: TrainConfig, intervals: tuple[int, int],
         val_windows: int) -> Plan:
    """The plan of a budget of `seconds` with `spent` gone, from `costs`: the steps whose end is nearest the budget, the
    evaluations' batches within EVAL_SHARE of it, the final score of the kept checkpoint on the `val_windows` of the
    split (those that fit FINAL_SHARE of it, and more in the time the steps leave) and the warmup within WARMUP_SHARE
    of the steps; refused (`BudgetRefused`) where MIN_STEPS steps, an evaluation, the checkpoint, the final score and
    the end do not fit."""
    val_batch = costs.eval_batch / 2  # an evaluation's batch scores both splits
    final = final_windows(val_windows, train.batch_size, FINAL_SHARE * seconds, val_batch)

    def laid(batches: int) -> Plan:
        made = Plan(seconds, 0, 0, spent, costs.step, costs.evaluation(batches), costs.checkpoint, costs.finish,
                    eval_iters=batches, final_windows=final, val_windows=val_windows,
                    final_seconds=-(-final // train.batch_size) * val_batch)
        return dataclasses.replace(made, max_iters=made.nearest(seconds - spent, intervals))

    made = laid(train.eval_iters)
    for _ in range(4):  # fewer batches leave room for more steps, and so more evaluations: settled in a pass or two
        evals = made.max_iters // intervals[0] + (made.max_iters % intervals[0] != 0)
        room = EVAL_SHARE * seconds / max(1, evals) - costs.eval_fixed
        batches = max(1, min(made.eval_iters, int(room / costs.eval_batch) if costs.eval_batch > 0 else
                             made.eval_iters))
        if batches == made.eval_iters:
            break
        made = laid(batches)
    if made.max_iters < MIN_STEPS:
        made = laid(1)
    if made.max_iters < MIN_STEPS:
        raise BudgetRefused(seconds, made, intervals)
    # A step over the budget, or one short of it with the final score grown into what it leaves: the nearer end
    # (a few long steps end up to half a step away, and that time scores the val split instead).
    ends = [_filled(dataclasses.replace(made, max_iters=n), val_batch, train.batch_size, intervals)
            for n in (made.max_iters, made.max_iters - 1) if n >= MIN_STEPS]
    made = min(ends, key=lambda m: abs(m.spent + m.needed(m.max_iters, intervals) - seconds))
    warmup = train.warmup_iters if train.warmup_iters <= WARMUP_SHARE * made.max_iters else \
        max(1, round(WARMUP_SHARE * made.max_iters))
    return dataclasses.replace(made, warmup=warmup)


def _filled(made: Plan, val_batch: float, batch_size: int, intervals: tuple[int, int]) -> Plan:
    """`made` with its final score grown into the time its steps leave of the budget, up to the whole split."""
    left = made.seconds - made.spent - made.needed(made.max_iters, intervals)
    if left <= 0 or val_batch <= 0:
        return made
    windows = min(made.val_windows, made.final_windows + int(left / val_batch) * batch_size)
    return dataclasses.replace(made, final_windows=windows, final_seconds=-(-windows // batch_size) * val_batch)


class Budget:
    """A budgeted run's plan in force. `live` in the process that planned it: the LR's position follows the budget's
    clock (`after_step`, the one call the loop makes), and the last step is decided a step ahead; else (a resumed run,
    `resumed`) by steps, its steps timed only to say what the rest takes here. `lag` is how many steps late the seconds
    spent arrive (one under torchrun), so every rank decides alike."""

    def __init__(self, made: Plan, intervals: tuple[int, int], live: bool = True, lag: int = 0):
        self.plan, self.intervals, self.live, self.lag = made, intervals, live, lag
        self.resumed_at: int | None = None  # the step a resumed run went on from
        self.before = 0.0  # the seconds the run's earlier processes took to `resumed_at`, start-ups included
        self.last = made.max_iters  # the steps the run trains: foreseen, final once `decided`
        self.decided = not live
        self.at_once = False  # decided after the step it ends at: that step's checkpoint kept the plan from before
        self._seen = (made.step, made.spent)  # the newest step whose start is known, and the seconds spent then
        self._steps: deque[float] = deque(maxlen=PACE_STEPS)  # the newest steps' seconds, evaluations left out
        # An evaluation runs on the cores the steps do, so a load that slows them slows it alike: kept in steps.
        self._eval_steps = made.eval_seconds / made.step_seconds if made.step_seconds > 0 else 0.0
        self._checkpoint = made.checkpoint_seconds
        self._anchor: tuple[float, float, float] | None = None  # the decay laid from (seconds, position) to an end
        self._given = made.position  # the newest position handed out: none after it is lower
        self.line: str | None = None  # what the newest `after_step` decided that is worth a line
        self.event: Plan | None = made if live else None  # the plan to log: as made, then where `after_step` changed it

    @classmethod
    def resumed(cls, saved: dict[str, Any], step: int, intervals: tuple[int, int], lag: int = 0,
                spent: float = 0.0) -> Budget:
        """A checkpoint's budget (`state_dict`) going on by steps from `step`, in a process `spent` seconds old."""
        made = Plan.of(saved)
        budget = cls(made, intervals, live=False, lag=lag)
        budget.resumed_at, budget.before, budget._seen = step, float(saved.get("taken", made.spent)), (step, spent)
        return budget

    @property
    def warmup(self) -> int:
        """The step the warmup ends at: the plan's, or the last step where the run was decided to end within it, which
        then trains at min_lr as every run's last step does."""
        return min(self.plan.warmup, self.last - 1) if self.decided else self.plan.warmup

    @property
    def pace(self) -> float:
        """The median of the newest PACE_STEPS steps, the planned step standing for those not yet measured: a run's
        first step (a compile, a cache filled) is as much an outlier as any other."""
        return statistics.median([*self._steps, *[self.plan.step_seconds] * (PACE_STEPS - len(self._steps))])

    def _end(self) -> float:
        """When the last step must end: the budget less the last evaluation, its checkpoint, the final score (its
        planned seconds: it scores the windows that fit what is left, `final_windows`) and the exit."""
        return (self.plan.seconds - self._eval_steps * self.pace - self._checkpoint - self.plan.final_seconds
                - self.plan.finish_seconds)

    def final_windows(self, batch_size: int, spent: float, evaluation: float) -> int:
        """The windows the final score covers with `spent` seconds gone, a batch at the price the run's last
        evaluation paid for one (`evaluation` seconds for `eval_iters` batches of each split: the same forward, on
        the cores and under the load of a moment ago; not the start-up's one timed forward scaled by the steps' pace,
        which a forward does not keep, a plugin's least): those planned, and more where what is left of the budget
        before the exit holds them, up to the whole split; fewer, those that fit, only where the planned ones would end
        the run past HELD_SHARE of its budget. A last step that ends late (its evaluation took longer than the one
        before) is the steps' lateness, not the final score's: taken from it, a score planned at a fraction of a second
        would shrink to a batch. As planned in a resumed run, whose clock is another process's."""
        p = self.plan
        if not self.live or p.final_seconds <= 0 or evaluation <= 0:
            return p.final_windows
        batch = evaluation / (2 * p.eval_iters)
        fits = final_windows(p.val_windows, batch_size, p.seconds - spent - p.finish_seconds, batch)
        late = spent + -(-p.final_windows // batch_size) * batch + p.finish_seconds - (1 + HELD_SHARE) * p.seconds
        return max(fits, p.final_windows) if late <= 0 else fits

    def _began(self, step: int) -> float:
        """The seconds spent when `step` begins, as the newest known start and the pace foresee it."""
        seen, spent = self._seen
        return spent + (step - seen) * self.pace

    def _position_at(self, step: int) -> float:
        if step < self.warmup:
            return self._given
        if step >= self.last - 1 and self.decided:
            return 1.0
        if not self.live:
            return position_between(step, self.plan.step, self.plan.position, self.last - 1)
        if self._anchor is None:  # the decay begins, laid as by steps: from the peak after warmup to the last step
            self._anchor = (self._began(self.warmup), self._given, self._end() - self.pace)
        began, where, end = self._anchor
        share = (self._began(step) - began) / (end - began) if end > began else 1.0
        return max(self._given, min(1.0, where + (1 - where) * share))

    def position(self, step: int) -> float:
        """Where the decay stands at `step`, the step about to train (after warmup; 0 the peak, 1 min_lr): by the
        budget's clock while live, else by steps; 1 at the last step."""
        self._given = self._position_at(step)
        return self._given

    def after_step(self, step: int, spent: float) -> None:
        """The run has trained `step` steps, and `spent` seconds had gone when step `step - lag` began: the pace and
        costs measured, the decay laid again to the end they foresee (never rising), and the last step decided where the
        next one must be it. `line` and `event` say what changed."""
        self.line = self.event = None
        step -= self.lag
        if (self.decided and self.resumed_at is None) or step <= self._seen[0]:  # decided: timed only when resumed
            return
        timed = len(self._steps)
        if step == self._seen[0] + 1:
            self._measured(step, spent - self._seen[1])
        self._seen = (step, spent)
        if not self.live:
            if len(self._steps) == PACE_STEPS > timed:
                self.line = self._rest_here(step, spent)
            return
        if self._anchor is not None and self._anchor[2] != self._end() - self.pace:  # min_lr as the last step begins
            self._anchor = (spent, self._position_at(step), self._end() - self.pace)
        now = self._now(step)
        last = step + now.nearest(self.plan.seconds - spent, self.intervals)
        if last <= step + self.lag + 1:
            self._decide(max(step + self.lag, last), now)
            return
        if abs(last - self.last) > MOVED_SHARE * self.last:
            self.event = dataclasses.replace(now, max_iters=last, reason="pace")
        self.last = last

    def _measured(self, step: int, seconds: float) -> None:
        """The seconds from one step's start to the next's: a step, or a step and what followed it."""
        every_eval, every_checkpoint = self.intervals
        if step % every_eval and step % every_checkpoint:
            self._steps.append(seconds)
        elif self.pace <= 0:  # a resumed plan of an older version, without its pace: steps are timed first
            return
        elif step % every_eval == 0:  # an evaluation, and mostly the checkpoint of its new best
            self._eval_steps = max(0.0, seconds - self.pace - self._checkpoint) / self.pace
        else:
            self._checkpoint = max(0.0, seconds - self.pace)

    def _now(self, step: int) -> Plan:
        """The plan as it stands at `step`: the figures measured so far, the end foreseen."""
        return dataclasses.replace(self.plan, step=step, spent=self._began(step), step_seconds=self.pace,
                                   eval_seconds=self._eval_steps * self.pace, checkpoint_seconds=self._checkpoint,
                                   max_iters=self.last, position=self._position_at(step), warmup=self.warmup)

    def _decide(self, last: int, now: Plan) -> None:
        """The run's last step is `last`: said where it ends the run at once, or comes well before the end
        foreseen."""
        foreseen, self.last, self.decided = self.last, last, True
        self.event = dataclasses.replace(now, max_iters=last, reason="last", warmup=self.warmup)
        self.at_once = last <= now.step + self.lag
        if self.at_once:
            self.line = (f"budget {self.plan.seconds:g} s: {max(0.0, self.plan.seconds - now.spent):.1f} s left at "
                         f"step {last}, less than another step ({now.step_seconds:.2f} s) and the end "
                         f"({now.needed(1, self.intervals) - now.step_seconds:.2f} s) need: the run ends here.")
        elif foreseen - last > MOVED_SHARE * foreseen:
            self.line = (f"budget {self.plan.seconds:g} s: steps now take {1000 * now.step_seconds:,.1f} ms (planned "
                         f"at {1000 * self.plan.step_seconds:,.1f}): step {last} is the last, not {foreseen}, at "
                         "min_lr, with its evaluation and checkpoint.")

    def state_dict(self) -> dict[str, Any] | None:
        """The plan as it stands at the next step: what a resumed run goes on by; a resumed run's plan as it went on by
        it, with `taken`, the seconds the run's processes had taken at the next step (its decay by steps is laid from
        the plan's step, so that resuming again trains exactly as going on would). None of a run by steps."""
        if not self.plan.seconds:
            return None
        step = self._seen[0] + self.lag + 1
        if self.live:
            return dataclasses.asdict(self._now(step))
        return {**dataclasses.asdict(self.plan), "taken": self.before + self._began(step)}

    def end(self, spent: float) -> tuple[float | None, str | None]:
        """The seconds the run took over all its processes with `spent` gone in this one, and how the budget held;
        neither of a run by steps."""
        return (round(self.before + spent, 3), self.ended(spent)) if self.plan.seconds else (None, None)

    def _rest(self, step: int, spent: float) -> tuple[float, float]:
        """The seconds the steps after `step`, their evaluations, the final score and the end take at the pace the
        steps show (the planned pace for those not timed), and those the run takes in all with `spent` gone in this
        process (a resumed run's earlier processes' too)."""
        now, p = self._now(step), self.plan
        slower = now.step_seconds / p.step_seconds if p.step_seconds > 0 else 1.0
        rest = dataclasses.replace(now, final_seconds=p.final_seconds * slower).needed(self.last - step,
                                                                                       self.intervals)
        return rest, self.before + spent + rest

    def resume_line(self) -> str:
        """What a resumed run goes on by, what the rest needs as planned, and how to end elsewhere."""
        p, step = self.plan, self.resumed_at or 0
        if step >= self.last:
            return f"budget {p.seconds:g} s: its plan's {self.last:,} steps are trained ({self.before:.1f} s taken)."
        rest, total = self._rest(step, self._seen[1])
        final = f", then the final score on {covered(p.final_windows, p.val_windows)}" if p.final_windows else ""
        planned = (f", and at the {_ms(p.step_seconds)} a step planned the rest needs ~{_duration(rest)}, "
                   f"~{_duration(total)} in all ({total - p.seconds:+.1f} s on its budget; said again" if p.step_seconds
                   else " (what the rest takes here is said")
        return (f"budget {p.seconds:g} s: resumed at step {step:,} by its checkpoint's plan, by steps (this process's "
                f"clock is not the one that planned it): {self.last - step:,} steps left, to min_lr at step "
                f"{self.last:,}{final}; {self.before:.1f} s taken so far{planned} once {PACE_STEPS} steps are timed "
                f"here). To end elsewhere, resume it with {BY_STEPS}: by steps, to min_lr at step N.")

    def _rest_here(self, step: int, spent: float) -> str:
        """What the rest of a resumed run takes here, from the steps timed here."""
        p, (rest, total) = self.plan, self._rest(step, spent)
        planned = f" ({_ms(p.step_seconds)} planned)" if p.step_seconds else ""
        said = (f"budget {p.seconds:g} s: steps take {_ms(self.pace)} here{planned}: the "
                f"{self.last - step:,} left and the end need ~{_duration(rest)}, the run ~{_duration(total)} in all "
                f"({total - p.seconds:+.1f} s on its budget)")
        if total > (1 + HELD_SHARE) * p.seconds:
            said += f"; to end sooner, stop it and resume it with {BY_STEPS}"
        return said + "."

    def ended(self, spent: float) -> str:
        """How the budget held, with `spent` seconds gone in this process at its end: the seconds planned against
        those taken, over every process of a resumed run."""
        p, taken = self.plan, self.before + spent
        share = 100 * (taken / p.seconds - 1)
        held = f"{taken - p.seconds:+.1f} s" + (f", {share:+.1f}%" if abs(share) < 100 else "")
        if self.resumed_at is None:
            return f"budget {p.seconds:g} s: the run ended {spent:.1f} s after the command started ({held})"
        planned = f" ({_ms(p.step_seconds)} planned)" if p.step_seconds else ""
        pace = f", its steps {_ms(self.pace)}{planned}" if len(self._steps) == PACE_STEPS else ""
        return (f"budget {p.seconds:g} s: resumed at step {self.resumed_at:,} by its plan, the run took {taken:.1f} s "
                f"({held}): {self.before:.1f} s to step {self.resumed_at:,}, {spent:.1f} s in this process{pace}")

    def describe(self, train: TrainConfig) -> str:
        """The first plan in a sentence, with what it fitted to the budget."""
        p = self.plan
        said = [f"budget {p.seconds:g} s: {p.max_iters:,} steps ({1000 * p.step_seconds:,.1f} ms a step, evaluation "
                f"{p.eval_seconds:.2f} s, checkpoint {p.checkpoint_seconds:.2f} s) after {p.spent:.1f} s of "
                f"start-up; the LR follows the budget's clock to {train.min_lr:.1e} at its end"]
        cut = (f", the whole split taking more than {FINAL_SHARE:.0%} of the budget" if p.final_windows < p.val_windows
               else "")
        said.append(f"the final score on {covered(p.final_windows, p.val_windows)} ({p.final_seconds:.1f} s){cut}, "
                    f"more where the time left at the end holds them, fewer only where the run would end over "
                    f"{HELD_SHARE:.0%} past its budget")
        if p.eval_iters < train.eval_iters:
            said.append(f"evaluations of {p.eval_iters} batch{'es' * (p.eval_iters > 1)} a split, not "
                        f"{train.eval_iters} (train.eval_iters): at that many they would take more than "
                        f"{EVAL_SHARE:.0%} of the budget")
        if p.warmup < train.warmup_iters:
            said.append(f"the peak LR at step {p.warmup}, not at {train.warmup_iters} (train.warmup_iters, more than "
                        f"{WARMUP_SHARE:.0%} of the {p.max_iters} steps)")
        return "; ".join(said)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f} ms"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else format_duration(seconds)


# A run by steps' budget: none, a plan of no seconds that neither times, says nor saves anything.
NO_BUDGET = Budget(Plan(0.0), (1, 1), live=False)
