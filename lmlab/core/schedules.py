"""The schedule kinds `train.schedule` names: `SCHEDULES`, the one list of them, which the config checks its setting
by and lmlab.train.schedule derives every LR from. A kind is the share of the fall from the peak to min_lr still left
at a position of the run after its warmup (0 the peak, 1 min_lr); `train` is a run's TrainConfig."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Kind:
    """A schedule kind: `left(position, train)`, the share of the fall from the peak to min_lr still left at
    `position` (0 the warmup's end, 1 the last step's), 1 at 0, 0 at 1, never rising between; `about`, its line in
    the config reference. tests/test_schedule.py holds every entry to this."""

    left: Callable[[float, Any], float]
    about: str


def _wsd(position: float, train: Any) -> float:
    """The constant peak, then the fall: the peak makes any earlier checkpoint a good start for a longer run (only the
    short decay is redone). The fall begins, by steps, where the last decay_fraction of the run's steps (the warmup's
    included) begins; by a budget's clock (one step, no warmup), at 1 - decay_fraction."""
    end = decay_end(train)
    stable = max(0.0, 1.0 - train.decay_fraction * end / max(1, end - 1 - train.warmup_iters))
    progress = (position - stable) / (1.0 - stable)
    return 1.0 if progress <= 1e-12 else 1.0 - math.sqrt(min(1.0, progress))


SCHEDULES: dict[str, Kind] = {
    "cosine": Kind(lambda position, _: 0.5 * (1.0 + math.cos(math.pi * min(1.0, position))),
                   "a half cosine to min_lr"),
    # 1-sqrt: Hägele et al. 2024 found it better than a linear fall.
    "wsd": Kind(_wsd, "warmup-stable-decay: the peak, then a 1-sqrt fall to min_lr over the last decay_fraction of "
                      "the steps"),
    "linear": Kind(lambda position, _: 1.0 - min(1.0, position), "a straight line to min_lr"),
}


def choices() -> str:
    """The kinds as the config reference lists them: `cosine (a half cosine to min_lr) | wsd (...)`."""
    return " | ".join(f"{name} ({kind.about})" for name, kind in SCHEDULES.items())


def decay_end(train: Any) -> int:
    """The step after the first whose LR is min_lr: lr_decay_iters, or max_iters."""
    return train.lr_decay_iters or train.max_iters
