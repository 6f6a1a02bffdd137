"""The learning-rate schedule: `Schedule` alone answers a step's LR and which step is the last. A schedule kind is one
entry of `SCHEDULES` (lmlab.core.schedules: the one list of them): the share of the fall from the peak to min_lr
still left at a position of the run after its warmup (0 the peak, 1 min_lr). All else derives from it and from the one
warmup (`warmup_lr`): the LR by steps (`lr_at`), by a time budget's clock, and after a resume with another length, which
lays the decay again from where it stands so that the LR never jumps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmlab.core.config import TrainConfig
from lmlab.core.schedules import SCHEDULES, decay_end
from lmlab.train.budget import Budget, position_between

# What the LR of a step depends on besides max_iters and lr_decay_iters: a resume that changes any re-lays the decay.
_SHAPE = ("learning_rate", "min_lr", "schedule", "decay_fraction", "warmup_iters", "budget_seconds")
FIELDS = ("max_iters", "lr_decay_iters", *_SHAPE)  # what a checkpoint keeps of the schedule it followed


def warmup_lr(step: int, peak: float, steps: int) -> float:
    """The LR of `step` of a linear warmup over `steps` steps to `peak`, which the step after it reaches."""
    return peak * (step + 1) / (steps + 1)


def lr_at_position(position: float, train: TrainConfig) -> float:
    """The LR after warmup at `position` (0 the peak, 1 min_lr) of the kind `train.schedule` names."""
    return train.min_lr + SCHEDULES[train.schedule].left(position, train) * (train.learning_rate - train.min_lr)


def lr_at(step: int, train: TrainConfig) -> float:
    """The LR of `step` by the steps: the warmup over warmup_iters, then the kind's fall laid from the peak at the
    step after it to min_lr at the last step before `decay_end`."""
    if step < train.warmup_iters:
        return warmup_lr(step, train.learning_rate, train.warmup_iters)
    return lr_at_position(position_between(step, train.warmup_iters, 0.0, decay_end(train) - 1), train)


def position_of(lr: float, train: TrainConfig) -> float:
    """The first position where the kind's LR is down to `lr` (`lr_at_position`'s inverse, clipped to [0, 1]): the
    peak is 0, even in wsd's stable stretch, which continues from there. Bisected: every kind's fall is monotone."""
    if lr >= train.learning_rate or lr <= train.min_lr:
        return 0.0 if lr >= train.learning_rate else 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if lr_at_position(mid, train) > lr else (low, mid)
    return high


@dataclass(frozen=True)
class Decay:
    """The decay from `position` (0 the peak, 1 min_lr) at step `anchor` to min_lr at step `end`."""

    anchor: int
    position: float
    end: int

    def position_at(self, step: int) -> float:
        return position_between(step, self.anchor, self.position, self.end - 1)


class Schedule:
    """The LR of every step and the last step of a run: the config's own warmup and decay, a resumed run's decay
    laid again from where it stood, or a time budget's (`budget`: its warmup, and its decay's position at a step);
    times the LR scale that the spike guard's rollbacks lower (`scale`)."""

    def __init__(self, train: TrainConfig, scale: Callable[[], float] = lambda: 1.0):
        self.train = train  # the settings it follows
        self.decay: Decay | None = None  # laid again by a resume with another length
        self.budget: Budget | None = None
        self._scale = scale

    @property
    def last_step(self) -> int:
        """The step the run trains to: max_iters, or the last its budget foresees (or decided)."""
        return self.budget.last if self.budget else self.train.max_iters

    def lr(self, step: int) -> float:
        """The LR of `step` (its index, from 0), the guard's scale included."""
        return self.unscaled_lr(step) * self._scale()

    def unscaled_lr(self, step: int) -> float:
        train, budget = self.train, self.budget
        if budget is None:
            return lr_at(step, train) if self.decay is None else lr_at_position(self.decay.position_at(step), train)
        if step < budget.warmup:
            return warmup_lr(step, train.learning_rate, budget.plan.warmup)
        # Its positions follow its clock from its own warmup's end: the kind is given no steps of the config's.
        return lr_at_position(budget.position(step), dataclasses.replace(train, max_iters=1, warmup_iters=0))

    def resume_with(self, new: TrainConfig, step: int, old_lr: float) -> str | None:
        """Go on at `step` under `new`, the run having had `old_lr` there under this schedule: `new`'s own where it
        is continuous there (still in warmup; wsd in its stable stretch, whose decay simply moves), else a decay laid
        from `old_lr` (no warmup again) to min_lr at the new end; the line that says so (None: its length is as it
        was)."""
        old, kept = self.train, self.decay
        self.train, self.decay = new, kept
        end = decay_end(new)
        same = decay_end(old) == end and all(getattr(old, k) == getattr(new, k) for k in _SHAPE)
        if same and old.max_iters == new.max_iters:
            return None
        if not same:
            own = lr_at(step, new)
            continuous = step < new.warmup_iters or end <= step or math.isclose(own, old_lr, rel_tol=1e-6)
            self.decay = None if continuous else Decay(step, position_of(old_lr, new), end)
        how = "kept" if self.decay is kept else "re-laid"
        lr = self.unscaled_lr(step)
        if end <= step:
            return f"schedule {how} from step {step}: lr {lr:.1e}, min_lr since step {end}"
        rising = (f", rising to {new.learning_rate:.1e} by step {new.warmup_iters} (warmup), then"
                  if self.decay is None and step < new.warmup_iters < end else "")  # else `unreached` says it
        return f"schedule {how} from step {step}: lr {lr:.1e}{rising} -> {new.min_lr:.1e} at step {end}"

    def unreached(self, step: int) -> str | None:
        """What of the schedule cannot take effect in the steps from `step` to the last, as a note: a
        decay_fraction of a kind that has none; by steps, a warmup as long as the run (the LR never reaches its peak,
        nor min_lr), a decay ending by the warmup's end (no step at the peak) or after the run (never min_lr).
        None where it all does (a budget's plan fits warmup and decay to its steps)."""
        t, last = self.train, self.last_step
        said = [f"train.decay_fraction ({t.decay_fraction:g}) is wsd's; train.schedule {t.schedule} has none"] \
            if t.schedule != "wsd" and t.decay_fraction != TrainConfig.decay_fraction else []
        end = self.unscaled_lr(last - 1) if self.budget is None and last > step else t.min_lr
        laid = self.budget is None and self.decay is None and step <= t.warmup_iters  # the config's own warmup to come
        if laid and step < t.warmup_iters and last <= t.warmup_iters:
            said.append(f"train.warmup_iters ({t.warmup_iters:,}) is not below the {last:,} steps: the LR rises to "
                        f"{end:.1e}, never to learning_rate ({t.learning_rate:.1e}), and never falls to min_lr")
        elif laid and decay_end(t) <= t.warmup_iters + 1:
            said.append(f"the decay ends at step {decay_end(t):,}, leaving no step at the peak after the "
                        f"{t.warmup_iters:,} of the warmup: the LR goes from "
                        f"{self.unscaled_lr(t.warmup_iters - 1):.1e} to min_lr at step {t.warmup_iters:,}, never to "
                        f"learning_rate ({t.learning_rate:.1e})")
        elif end > t.min_lr * (1 + 1e-6):
            said.append(f"its last step trains at {end:.1e}, above min_lr ({t.min_lr:.1e})" +
                        (f": the decay ends at step {decay_end(t):,} (train.lr_decay_iters), after the run"
                         if decay_end(t) > last else ""))
        return f"note: {'; '.join(said)}" if said else None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the schedule its run followed (config.toml may be rewritten by a resume that did
        not get as far as a checkpoint)."""
        relaid = dataclasses.asdict(self.decay) if self.decay is not None else None
        return {"train": {k: getattr(self.train, k) for k in FIELDS}, "relaid": relaid}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's schedule over the one its run's config.toml has (all of it, before lmlab kept it)."""
        kept, relaid = (state or {}).get("train"), (state or {}).get("relaid")
        if kept:
            self.train = dataclasses.replace(self.train, **kept)
        self.decay = Decay(**relaid) if relaid and relaid.get("end") is not None else None
