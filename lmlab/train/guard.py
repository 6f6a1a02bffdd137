"""Loss-spike and NaN guard: judge each step's loss and gradient norm against their recent history."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_OVERFLOWS = 17  # fp16 grad-scaler skips in a row that are still the scaler's own (see SpikeGuard)


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
    """Says what to do with a step: apply it, skip it (non-finite), flag it (spike), or roll back; and keeps the
    LR scale that each rollback lowers.

    Statistics learn only from good steps, so a run of spikes does not teach the guard that spikes
    are normal. The first `warmup` steps neither count nor are flagged: early losses fall so fast that
    they would inflate the variance and hide later spikes.

    Under the fp16 grad scaler, a finite loss with non-finite gradients is the scaler's own business: it
    skipped the update and halved its scale, as it does whenever the scaled gradients overflow fp16. Such a
    step is an "overflow", not a bad step, unless MAX_OVERFLOWS of them come in a row: from its initial 2**16
    the scale is below 1 after 17 halvings, so past that the gradients overflow unscaled.
    """

    zscore: float  # a loss or grad norm this many standard deviations above its running mean is a spike
    patience: int  # this many bad steps in a row trigger a rollback; 0 never rolls back
    lr_factor: float = 0.5  # each rollback multiplies the LR scale by it
    warmup: int = 50
    min_samples: int = 20  # good steps after warmup before anything is flagged
    loss: RunningStat = field(default_factory=RunningStat)
    grad_norm: RunningStat = field(default_factory=RunningStat)
    bad_in_row: int = 0
    overflows_in_row: int = 0
    seen: int = 0
    lr_scale: float = 1.0

    def judge(self, loss: float, grad_norm: float, scaled: bool = False) -> str:
        """One of "ok", "skip" (non-finite: not applied), "spike" (applied but counted), "rollback", or with
        `scaled` (the fp16 grad scaler is on) "overflow" (the scaler skipped it; not counted)."""
        self.seen += 1
        overflow = scaled and math.isfinite(loss) and not math.isfinite(grad_norm)
        self.overflows_in_row = self.overflows_in_row + 1 if overflow else 0
        if overflow and self.overflows_in_row <= MAX_OVERFLOWS:
            return "overflow"
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
            self.lr_scale *= self.lr_factor
            return "rollback"
        return verdict

    def state_dict(self) -> dict[str, Any]:
        return {"loss": asdict(self.loss), "grad_norm": asdict(self.grad_norm), "bad_in_row": self.bad_in_row,
                "overflows_in_row": self.overflows_in_row, "seen": self.seen, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss, self.grad_norm = RunningStat(**state["loss"]), RunningStat(**state["grad_norm"])
        self.bad_in_row, self.seen, self.lr_scale = state["bad_in_row"], state["seen"], state["lr_scale"]
        self.overflows_in_row = state.get("overflows_in_row", 0)  # absent from checkpoints written before it
