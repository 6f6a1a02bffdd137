"""The learning-rate schedule: `Schedule` alone answers a step's LR and which step is the last: a warmup, then a cosine
or warmup-stable-decay fall to min_lr, over the steps or over a time budget's clock; a resume with another length lays
the decay again from where it stands, so the LR never jumps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.core.config import TrainConfig

if TYPE_CHECKING:
    from lmlab.train.budget import Budget

# What the LR of a step depends on besides max_iters and lr_decay_iters: a resume that changes any re-lays the decay.
_SHAPE = ("learning_rate", "min_lr", "schedule", "decay_fraction", "warmup_iters", "budget_seconds")
FIELDS = ("max_iters", "lr_decay_iters", *_SHAPE)  # what a checkpoint keeps of the schedule it followed


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then the schedule's decay to min_lr.

    cosine: a half cosine to min_lr at lr_decay_iters (default max_iters).
    wsd (warmup-stable-decay): constant at the peak, then over the last decay_fraction of max_iters a
    1-sqrt decay to min_lr (Hägele et al. 2024 found 1-sqrt better than linear). The constant phase makes
    any earlier checkpoint a good start for a longer run: only the short decay has to be redone.
    """
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_iters, round(cfg.max_iters * (1.0 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.learning_rate
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_iters - decay_start))
        return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    return _cosine((step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters), cfg)


def _cosine(progress: float, cfg: TrainConfig) -> float:
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def lr_at_position(position: float, cfg: TrainConfig) -> float:
    """The schedule's LR after warmup at `position`, from 0 (the peak) to 1 (min_lr), for a decay laid over steps
    that change as it goes: cosine, or wsd's constant peak and then its 1-sqrt decay over the last decay_fraction of
    the positions."""
    if cfg.schedule != "wsd":
        return _cosine(position, cfg)
    stable = 1.0 - cfg.decay_fraction
    if position < stable:
        return cfg.learning_rate
    progress = (position - stable) / cfg.decay_fraction
    return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)


def position_between(step: int, anchor: int, position: float, last: int) -> float:
    """A decay laid from `position` at step `anchor` to 1 (min_lr) at step `last`, linear in the steps: where it
    stands at `step`."""
    if last <= anchor:
        return 1.0
    return min(1.0, position + (1.0 - position) * max(0, step - anchor) / (last - anchor))


def position_of(lr: float, cfg: TrainConfig) -> float:
    """Where the schedule's LR is `lr` (`lr_at_position`'s inverse, clipped to [0, 1]): the peak is 0, even in wsd's
    stable stretch, which continues from there."""
    span = cfg.learning_rate - cfg.min_lr
    share = 1.0 if span <= 0 else min(1.0, max(0.0, (lr - cfg.min_lr) / span))
    if cfg.schedule == "wsd":
        return 0.0 if share >= 1.0 else 1.0 - cfg.decay_fraction + cfg.decay_fraction * (1.0 - share) ** 2
    return math.acos(2.0 * share - 1.0) / math.pi


def decay_end(train: TrainConfig) -> int:
    """The step at which the LR reaches min_lr: lr_decay_iters (cosine) or max_iters."""
    return (train.lr_decay_iters if train.schedule == "cosine" else 0) or train.max_iters


@dataclass(frozen=True)
class Decay:
    """The decay from `position` (0 the peak, 1 min_lr) at step `anchor` to min_lr at step `end`."""

    anchor: int
    position: float
    end: int

    def position_at(self, step: int) -> float:
        return position_between(step, self.anchor, self.position, self.end - 1)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            return train.learning_rate * (step + 1) / (budget.plan.warmup + 1)
        return lr_at_position(budget.position(step), train)

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
                  if self.decay is None and step < new.warmup_iters else "")
        return f"schedule {how} from step {step}: lr {lr:.1e}{rising} -> {new.min_lr:.1e} at step {end}"

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the schedule its run followed (config.toml may be rewritten by a resume that did
        not get as far as a checkpoint)."""
        relaid = self.decay.state_dict() if self.decay is not None else None
        return {"train": {k: getattr(self.train, k) for k in FIELDS}, "relaid": relaid}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's schedule over the one its run's config.toml has (all of it, before lmlab kept it)."""
        kept, relaid = (state or {}).get("train"), (state or {}).get("relaid")
        if kept:
            self.train = dataclasses.replace(self.train, **kept)
        self.decay = Decay(**relaid) if relaid and relaid.get("end") is not None else None
