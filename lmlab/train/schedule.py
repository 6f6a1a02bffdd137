"""A resumed run's LR schedule when its length changed: `--set train.max_iters=N`, `train.lr_decay_iters`, a budget
dropped for steps (`train.budget_seconds=0`) or steps given a budget.

Laid by the new config as it stands, the schedule would jump: a cosine over 1,000 steps is far above the one over
500 that the run followed to step 240 (2.3e-4 became 1.4e-3, and val rose), and a run extended past an end it had
decayed to would climb again. So a resume whose schedule changed goes on from the LR it had at the step it resumed
from (no warmup again) and decays to min_lr at the new end, in the schedule's own shape (`Relaid`), and says so in one
line. Where the new config's own schedule is already continuous there (still in warmup; wsd in its stable stretch,
whose decay simply moves), it is kept. The re-laid schedule is kept by every later checkpoint, so a further resume
continues it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from lmlab.core.config import TrainConfig
from lmlab.train.optim import lr_at, lr_at_position, position_between, position_of

# What the LR of a step depends on, besides max_iters and lr_decay_iters: a change of any of them re-lays too.
_SHAPE = ("learning_rate", "min_lr", "schedule", "decay_fraction", "warmup_iters", "budget_seconds")
FIELDS = ("max_iters", "lr_decay_iters", *_SHAPE)  # what a checkpoint keeps of the schedule it followed


@dataclass(frozen=True)
class Relaid:
    """The schedule from `position` (0 the peak, 1 min_lr) at step `anchor` to min_lr at step `end`."""

    anchor: int
    position: float
    end: int

    def lr(self, step: int, train: TrainConfig) -> float:
        return lr_at_position(position_between(step, self.anchor, self.position, self.end - 1), train)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def followed(train: TrainConfig, relaid: Relaid | None) -> dict[str, Any]:
    """What a checkpoint keeps of the schedule its run followed: config.toml may be rewritten by a resume that
    did not get as far as a checkpoint, so a later resume compares against this."""
    return {"train": {k: getattr(train, k) for k in FIELDS}, "relaid": relaid and relaid.state_dict()}


def schedule_end(train: TrainConfig) -> int:
    """The step at which the LR reaches min_lr: lr_decay_iters (cosine) or max_iters."""
    return (train.lr_decay_iters if train.schedule == "cosine" else 0) or train.max_iters


def relay(old: TrainConfig, new: TrainConfig, step: int, old_lr: float,
          kept: Relaid | None) -> tuple[Relaid | None, str | None]:
    """The schedule a run resumed at `step` trains by under `new` (None: `new`'s own), after following `old` to an LR
    of `old_lr` (by `kept`, an earlier re-laying, if any), and the line that says what happens to it (None when its
    length is as it was). A budget's own plan lays the schedule of a budgeted `new`."""
    end = schedule_end(new)
    same = schedule_end(old) == end and all(getattr(old, k) == getattr(new, k) for k in _SHAPE)
    if new.budget_seconds or (same and old.max_iters == new.max_iters):
        return kept, None
    laid = kept
    if not same:
        own = lr_at(step, new)
        continuous = step < new.warmup_iters or end <= step or math.isclose(own, old_lr, rel_tol=1e-6)
        laid = None if continuous else Relaid(step, position_of(old_lr, new), end)
    lr = laid.lr(step, new) if laid else lr_at(step, new)
    how = "kept" if laid is kept else "re-laid"
    if end <= step:
        return laid, f"schedule {how} from step {step}: lr {lr:.1e}, min_lr since step {end}"
    return laid, f"schedule {how} from step {step}: lr {lr:.1e} -> {new.min_lr:.1e} at step {end}"


def budget_position(old_lr: float, step: int, new: TrainConfig) -> tuple[float, str | None]:
    """Where the schedule of a run resumed with a budget it has not planned yet stands (its plans lay the rest from
    there), and the line that says so when that is past the peak."""
    position = 0.0 if step < new.warmup_iters else position_of(old_lr, new)
    if not position:
        return 0.0, None
    return position, (f"schedule re-laid from step {step}: lr {lr_at_position(position, new):.1e}, held until the "
                      f"budget's first plan decays it to {new.min_lr:.1e} at its end")
