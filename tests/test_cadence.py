"""What follows a step: a train line, a checkpoint, an evaluation by steps or by passes (never drifting from the
passes it stands for), and an evaluation at the last step."""

from __future__ import annotations

import math

from lmlab.core.config import TrainConfig
from lmlab.train.cadence import Cadence


def test_evaluations_by_steps_and_at_the_last_step():
    cadence = Cadence(TrainConfig(log_interval=5, eval_interval=20, checkpoint_interval=30), 20, 100, 10_000)
    due = [(s, cadence.after(s, 100 * s, 70)) for s in range(1, 71)]
    assert [s for s, d in due if d.evaluate] == [20, 40, 60, 70]
    assert [s for s, d in due if d.save] == [30, 60] and [s for s, d in due if d.log] == list(range(5, 71, 5))
    assert not cadence.after(1, 100, 70)


def test_evaluations_by_passes_come_at_the_first_step_past_each():
    train = TrainConfig(eval_interval="0.5 epochs")
    split, per_step = 1_000, 128  # 7.8 steps a pass: rounding the steps would drift from the passes
    cadence = Cadence(train, train.eval_steps(split, per_step), per_step, split)
    evaluated = [s for s in range(1, 40) if cadence.after(s, s * per_step, 10**6).evaluate]
    assert evaluated == [math.ceil(k * split / 2 / per_step) for k in range(1, len(evaluated) + 1)]
    assert cadence.intervals == (4, train.checkpoint_interval)  # the steps nearest half a pass, as budgets plan
