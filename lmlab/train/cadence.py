"""When the training loop logs a train line, evaluates and saves a checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.core.config import TrainConfig


@dataclass(frozen=True)
class Due:
    """What the step just taken is followed by."""

    log: bool
    evaluate: bool
    save: bool

    def __bool__(self) -> bool:
        return self.log or self.evaluate or self.save


class Cadence:
    """A train line every log_interval steps, a checkpoint every checkpoint_interval, an evaluation every
    `eval_steps` steps or, spaced by passes over the train split (an eval_interval in epochs), at the first step
    past each spacing (never drifting from the passes it stands for, however the steps per pass round:
    `eval_steps`, the steps nearest one spacing, is what a time budget plans with); and one at the last step."""

    def __init__(self, train: TrainConfig, eval_steps: int, tokens_per_step: int, split_tokens: int):
        self.log_interval, self.checkpoint_interval = train.log_interval, train.checkpoint_interval
        self.eval_steps, self.tokens_per_step = eval_steps, tokens_per_step
        passes = train.passes_per_eval
        self.eval_tokens = None if passes is None else passes * split_tokens  # tokens between evaluations by passes

    @property
    def intervals(self) -> tuple[int, int]:
        """The steps between evaluations and between checkpoints, as a budget plans them."""
        return self.eval_steps, self.checkpoint_interval

    def after(self, step: int, tokens: int, last_step: int) -> Due:
        """What follows the step that brought the run to `step` and `tokens`."""
        unit = self.eval_tokens  # spaced by passes: the first step past each spacing evaluates
        evaluates = (step % self.eval_steps == 0 if unit is None
                     else math.floor(tokens / unit) > math.floor((tokens - self.tokens_per_step) / unit))
        return Due(step % self.log_interval == 0, evaluates or step == last_step, step % self.checkpoint_interval == 0)
