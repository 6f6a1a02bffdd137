"""`Schedule` alone answers a step's LR and the last step: the config's own, a budget's (its warmup, and its decay's
position at a step), a resumed run's decay laid again, each times the guard's LR scale."""

from __future__ import annotations

import dataclasses

import pytest

from lmlab.core.config import TrainConfig
from lmlab.train.budget import Budget, Plan
from lmlab.train.schedule import Decay, Schedule, lr_at, lr_at_position


def test_the_config_s_schedule_scaled_by_the_guard():
    train = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    scale = [1.0]
    schedule = Schedule(train, lambda: scale[0])
    assert schedule.last_step == 100 and [schedule.lr(s) for s in range(100)] == [lr_at(s, train) for s in range(100)]
    scale[0] = 0.5  # a rollback lowered it
    assert schedule.lr(50) == pytest.approx(0.5 * lr_at(50, train))


def test_a_budget_sets_the_warmup_the_decay_s_position_and_the_last_step():
    """A budget resumed from its checkpoint's plan goes by steps: its own warmup, then the decay from where the plan
    stood to min_lr at the plan's last step."""
    train = TrainConfig(budget_seconds=60, warmup_iters=100, learning_rate=1e-3, min_lr=1e-4)
    schedule = Schedule(train)
    schedule.budget = Budget(Plan(60.0, max_iters=200, step=40, warmup=10, position=0.25), (1000, 1000), live=False)
    assert schedule.last_step == 200
    assert schedule.lr(4) == pytest.approx(1e-3 * 5 / 11)  # the plan's warmup, not the config's 100 steps
    assert schedule.lr(40) == pytest.approx(lr_at_position(0.25, train)) and schedule.lr(199) == pytest.approx(1e-4)
    lrs = [schedule.lr(s) for s in range(40, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_resume_with_another_length_goes_on_from_the_lr_it_had():
    old = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    schedule = Schedule(old)
    had = schedule.lr(60)
    line = schedule.resume_with(dataclasses.replace(old, max_iters=300), 60, had)
    assert line.startswith("schedule re-laid from step 60")
    assert schedule.decay == Decay(60, schedule.decay.position, 300)
    assert schedule.lr(60) == pytest.approx(had) and schedule.lr(299) == pytest.approx(1e-4)
    kept = schedule.state_dict()
    again = Schedule(old)
    again.load_state_dict(kept)  # what a later resume reads back from the checkpoint
    assert again.decay == schedule.decay and again.train.max_iters == 300
    assert schedule.resume_with(again.train, 80, schedule.lr(80)) is None  # the same length: nothing to say
