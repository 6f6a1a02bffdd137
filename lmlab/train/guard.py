"""Loss-spike and NaN guard: judge each step's loss and gradient norm against their recent history."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RunningStat:
    """Exponential moving mean and variance; `alpha` 0.02 remembers roughly the last 50 steps."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    alpha = 0.02

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean = x
        else:
            delta = x - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.count += 1

    def zscore(self, x: float) -> float:
        # The variance starts at zero; divide out that bias (as Adam does for its moments), or the first
        # few dozen samples would make ordinary steps look like spikes.
        correction = 1 - (1 - self.alpha) ** max(1, self.count - 1)
        return (x - self.mean) / math.sqrt(self.var / correction + 1e-12)


@dataclass
class SpikeGuard:
    """Says what to do with a step: apply it, skip it (non-finite), flag it (spike), or roll back.

    Statistics learn only from good steps, so a run of spikes does not teach the guard that spikes
    are normal. The first `warmup` steps neither count nor are flagged: early losses fall so fast that
    they would inflate the variance and hide later spikes.
    """

    zscore: float  # a loss or grad norm this many standard deviations above its running mean is a spike
    patience: int  # this many bad steps in a row trigger a rollback; 0 never rolls back
    warmup: int = 50
    min_samples: int = 20  # good steps after warmup before anything is flagged
    loss: RunningStat | None = None
    grad_norm: RunningStat | None = None
    bad_in_row: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        self.loss = RunningStat(**self.loss) if isinstance(self.loss, dict) else self.loss or RunningStat()
        self.grad_norm = (RunningStat(**self.grad_norm) if isinstance(self.grad_norm, dict)
                          else self.grad_norm or RunningStat())

    def judge(self, loss: float, grad_norm: float) -> str:
        """One of "ok", "skip" (non-finite: do not apply), "spike" (apply but count it), "rollback"."""
        self.seen += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            verdict = "skip"
        elif self.loss.count >= self.min_samples and (self.loss.zscore(loss) > self.zscore
                                                      or self.grad_norm.zscore(grad_norm) > self.zscore):
            verdict = "spike"
        else:
            if self.seen > self.warmup:
                self.loss.update(loss)
                self.grad_norm.update(grad_norm)
            self.bad_in_row = 0
            return "ok"
        self.bad_in_row += 1
        if self.patience and self.bad_in_row >= self.patience:
            self.bad_in_row = 0
            return "rollback"
        return verdict
