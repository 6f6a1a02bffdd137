"""`Schedule` alone answers a step's LR and the last step: the config's own, a budget's (its warmup, and its decay's
position at a step), a resumed run's decay laid again, each times the guard's LR scale."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from lmlab.commands.reference import config_page
from lmlab.core.config import TrainConfig
from lmlab.core.schedules import SCHEDULES
from lmlab.train.budget import Budget, Plan
from lmlab.train.schedule import Decay, Schedule, lr_at, lr_at_position, position_between, position_of


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


# The contract every entry of SCHEDULES meets, so a new kind needs no test of its own.
PEAK, FLOOR, STEPS, WARMUP = 1e-3, 1e-4, 100, 10


def _config(kind: str, **changes) -> TrainConfig:
    return TrainConfig(**{"schedule": kind, "max_iters": STEPS, "warmup_iters": WARMUP, "learning_rate": PEAK,
                          "min_lr": FLOOR, "decay_fraction": 0.2, **changes})


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_kind_warms_up_to_the_peak_then_falls_to_min_lr_at_the_last_step(kind):
    assert SCHEDULES[kind].left(0.0, _config(kind)) == 1.0 and SCHEDULES[kind].left(1.0, _config(kind)) == 0.0
    assert SCHEDULES[kind].about in config_page()  # the config reference lists it
    lrs = [Schedule(_config(kind)).lr(s) for s in range(STEPS + 10)]
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP + 1])) and lrs[WARMUP - 1] < PEAK  # warmup rises
    assert max(lrs) == pytest.approx(PEAK, rel=1e-3)  # to the peak
    after = lrs[WARMUP:STEPS]
    assert all(FLOOR <= lr <= PEAK for lr in after) and all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[STEPS - 1] == pytest.approx(FLOOR) and all(lr == pytest.approx(FLOOR) for lr in lrs[STEPS:])
    for position in (0.0, 0.3, 0.85, 0.97, 1.0):  # where an LR stands, for a resume to go on from it
        lr = lr_at_position(position, _config(kind))
        assert lr_at_position(position_of(lr, _config(kind)), _config(kind)) == pytest.approx(lr)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_kind_resumed_at_any_step_goes_on_exactly(kind):
    """A resume with the same settings changes nothing; one with another length goes on from the LR it had and falls
    to min_lr at the new end; and that run resumed again from its checkpoint's schedule goes on as it would have."""
    old, longer = _config(kind), _config(kind, max_iters=2 * STEPS)
    whole = [Schedule(old).lr(s) for s in range(STEPS)]
    for at in range(0, STEPS, 3):
        same = Schedule(old)
        assert same.resume_with(old, at, same.unscaled_lr(at)) is None and [same.lr(s) for s in range(STEPS)] == whole
        extended = Schedule(old)
        extended.resume_with(longer, at, whole[at])
        lrs = [extended.lr(s) for s in range(at, 2 * STEPS)]
        assert lrs[0] == pytest.approx(whole[at]) and lrs[-1] == pytest.approx(FLOOR)
        again = Schedule(old)  # the next process: config.toml's schedule, then the checkpoint's
        again.load_state_dict(extended.state_dict())
        assert again.resume_with(longer, at + 7, extended.unscaled_lr(at + 7)) is None
        assert [again.lr(s) for s in range(at, 2 * STEPS)] == lrs


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_kind_by_a_budget_s_clock_at_its_planned_pace_is_where_it_is_by_steps(kind):
    """A budget planned as STEPS steps of a second each, whose steps take a second: the decay stands where it does by
    steps at every step, and a budget resumed from any step's plan goes on by steps exactly as the clock did."""
    train = _config(kind, budget_seconds=STEPS, max_iters=5000)
    made = Plan(float(STEPS), max_iters=STEPS, step_seconds=1.0, warmup=WARMUP)
    by_clock = Schedule(train)
    by_clock.budget = Budget(made, (1000, 1000))
    plans, lrs = {}, []
    for step in range(STEPS):
        lrs.append(by_clock.lr(step))
        if step >= WARMUP:
            assert by_clock.budget.position(step) == pytest.approx(position_between(step, WARMUP, 0.0, STEPS - 1))
        plans[step + 1] = by_clock.budget.state_dict()  # what a checkpoint after `step + 1` steps keeps
        by_clock.budget.after_step(step + 1, step + 1.0)
    assert by_clock.last_step == STEPS and lrs[:WARMUP] == [lr_at(s, _config(kind)) for s in range(WARMUP)]
    assert lrs[-1] == pytest.approx(FLOOR)
    for at in range(WARMUP, STEPS - 1, 4):
        resumed = Schedule(train)
        resumed.budget = Budget.resumed(plans[at], at, (1000, 1000))
        assert [resumed.lr(s) for s in range(at, STEPS)] == pytest.approx(lrs[at:], rel=1e-9)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("resumed_at", [None, 3, 12])
def test_the_note_on_a_schedule_says_exactly_what_of_it_cannot_take_effect(kind, resumed_at):
    """Over warmups, lengths and decay ends, new or resumed with another length at a step: the note names the peak
    where no step trains at learning_rate (a warmup as long as the run, or a decay ending by the warmup's end),
    min_lr where no step after the warmup trains at it, and decay_fraction where the kind has none; else it is None.
    What holds is read off the LRs the schedule gives the steps left."""
    for warmup, steps, decay_iters, fraction in itertools.product((0, 5, 19, 20, 500), (1, 20, 40),
                                                                  (0, 3, 100), (0.2, 0.5)):
        train = TrainConfig(max_iters=steps, warmup_iters=warmup, lr_decay_iters=decay_iters, schedule=kind,
                            decay_fraction=fraction, learning_rate=1e-3, min_lr=1e-4)
        schedule, first = Schedule(train), 0
        if resumed_at is not None:
            if resumed_at >= steps:
                continue
            schedule = Schedule(TrainConfig(max_iters=20, warmup_iters=5, learning_rate=1e-3, min_lr=1e-4))
            schedule.resume_with(train, resumed_at, schedule.unscaled_lr(resumed_at))
            first = resumed_at
        lrs = [schedule.unscaled_lr(s) for s in range(first, steps)]
        note = schedule.unreached(first) or ""
        peak_missed = resumed_at is None and max(lrs) < 1e-3 * (1 - 1e-9)  # a resumed run is past its peak, or...
        peak_missed |= resumed_at is not None and first < warmup and schedule.decay is None and max(lrs) < 1e-3 * (
            1 - 1e-9)  # ...goes on warming up to it
        after = [lr for s, lr in zip(range(first, steps), lrs) if s >= warmup or schedule.decay is not None]
        floor_missed = not any(lr <= 1e-4 * (1 + 1e-6) for lr in after)
        case = (kind, resumed_at, warmup, steps, decay_iters, fraction, note)
        assert ("never to learning_rate" in note) == peak_missed, case
        assert ("never falls to min_lr" in note or "above min_lr" in note) == floor_missed, case
        assert ("is wsd's" in note) == (kind != "wsd" and fraction != 0.2), case
