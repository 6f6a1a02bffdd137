"""A time budget's promises, held over every simulated machine of benchmarks/budget_traces.py (the real planner,
`Budget`, `Schedule` and `ThreadChooser` on a fake clock, no training): a run ends within 5% of its budget or is
refused before it trains; its last step is evaluated, at min_lr; after warmup its LR never rises; its decay is never
left behind the clock; `plan` foresees the steps a steady machine trains; and the threads follow the load without
flapping. A trace that breaks a promise it cannot keep (a step longer than what was left) says so in a line."""

from __future__ import annotations

import functools

import pytest

from benchmarks import budget_traces
from benchmarks.budget_traces import Trace, behind, traces

TRACES = traces()
simulate = functools.cache(budget_traces.simulate)  # each trace once, for both tests


def test_the_table_covers_every_kind_of_machine():
    names = [t.name for t in TRACES]
    assert len(TRACES) >= 30 and len(set(names)) == len(names)
    assert {t.step for t in TRACES} >= {0.01, 30.0} and any(t.refused for t in TRACES)
    assert {t.schedule for t in TRACES} == {"cosine", "wsd"} and any(t.resume_at for t in TRACES)
    assert {t.lag for t in TRACES} == {0, 1}
    assert {at for t in TRACES for at, _ in t.load} >= {0.1, 0.5, 0.9} and any(t.freeze for t in TRACES)


def steady(trace: Trace) -> bool:
    return not (trace.load or trace.freeze or trace.noise or trace.first_eval or trace.resume_at)


def ended_at_once(trace: Trace) -> bool:
    """A step longer than what was left of the budget: nothing could foresee it."""
    return bool(trace.freeze) and trace.freeze[1] > (1 - trace.freeze[0]) * trace.seconds


@pytest.mark.parametrize("trace", TRACES, ids=lambda t: t.name)
def test_a_budget_keeps_its_promises(trace):
    out = simulate(trace)
    train = out.train
    assert bool(out.refused) == trace.refused, out.refused
    if trace.refused:
        assert not out.lrs and "give a budget of at least" in out.refused  # before any step trained
        return
    assert out.evaluated[-1] == out.steps, "the last step was not evaluated"
    if not trace.resume_at:  # logged as decided, the warmup ended by the last step (a resumed run goes by steps)
        last = out.plans[-1]
        assert (last.reason, last.max_iters, last.warmup) == ("last", out.steps, min(out.warmup, out.steps - 1))
    if ended_at_once(trace):
        assert out.lines and out.lines[-1].endswith("the run ends here.")
        return
    if not trace.resume_at:  # a resumed run goes by steps, its second start-up besides
        assert abs(out.miss) <= 0.05, f"ended at {out.ended:.1f} s of {trace.seconds:g} s"
    assert out.lrs[-1] == pytest.approx(train.min_lr, rel=0.01)
    decaying = out.lrs[out.warmup:]
    assert all(a >= b for a, b in zip(decaying, decaying[1:])), "the LR rose after warmup"
    lag = behind(out)
    if lag is not None:  # within a step of the clock (and what the last evaluation measured besides)
        span = out.trace.seconds - out.began[out.warmup]
        longest = max(b - a for a, b in zip(out.began, out.began[1:]))
        assert lag <= 0.1 + longest / span, f"the decay lagged the clock by {lag:.3f}"
    if steady(trace):
        assert abs(out.steps - out.planned) <= max(1, 0.05 * out.planned), (out.planned, out.steps)


@pytest.mark.parametrize("trace", [t for t in TRACES if t.load], ids=lambda t: t.name)
def test_the_threads_follow_the_load_without_flapping(trace):
    """A trial of another count is undone at its first slower step, so the threads change at most twice (a trial
    and its undoing) for each change of the load, and a busy machine ends on the cores the others leave free."""
    out = simulate(trace)
    switches = sum(a != b for a, b in zip(out.threads, out.threads[1:]))
    assert switches <= 2 * len(trace.load) + 1
    if trace.load[-1][1] > 0 and trace.load[-1][0] < 0.5:
        assert out.threads[-1] == 1  # a hog on one of the two cores: one thread is what is left
