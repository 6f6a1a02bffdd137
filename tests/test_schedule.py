"""`Schedule` alone answers a step's LR and the last step: the config's own, a budget's plan laid over it, a resumed
run's decay laid again, each times the guard's LR scale."""

from __future__ import annotations

import dataclasses

import pytest

from lmlab.core.config import TrainConfig
from lmlab.train.planning import BudgetPlan
from lmlab.train.schedule import UNPLANNED, Decay, Schedule, lr_at


def test_the_config_s_schedule_scaled_by_the_guard():
    train = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    scale = [1.0]
    schedule = Schedule(train, lambda: scale[0])
    assert schedule.last_step == 100 and [schedule.lr(s) for s in range(100)] == [lr_at(s, train) for s in range(100)]
    scale[0] = 0.5  # a rollback lowered it
    assert schedule.lr(50) == pytest.approx(0.5 * lr_at(50, train))


def test_a_budget_s_plan_sets_the_last_step_and_lays_the_decay_from_where_it_stands():
    train = TrainConfig(budget_seconds=60, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    schedule = Schedule(train)
    plan = BudgetPlan(60.0)
    schedule.follow_plan(plan.max_iters, plan.decay(), plan.fixed)
    assert schedule.last_step == UNPLANNED and schedule.lr(50) == pytest.approx(1e-3)  # held at the peak
    plan = BudgetPlan(60.0, max_iters=200, step=40, anchor=40, position=0.0, reason="planned")
    schedule.follow_plan(plan.max_iters, plan.decay(), plan.fixed)
    assert schedule.last_step == 200 and schedule.train.max_iters == 200
    assert schedule.lr(40) == pytest.approx(1e-3) and schedule.lr(199) == pytest.approx(1e-4)
    assert schedule.lr(5) == lr_at(5, train)  # the warmup is the config's
    assert [schedule.lr(s) for s in (60, 120)] == [plan.lr(s, schedule.train) for s in (60, 120)]


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
