"""A time budget on simulated machines: the real planner, `Budget`, `Schedule` and `ThreadChooser` driven by a fake
clock and a model of two cores (a step's seconds by thread count and the others' load, evaluations, checkpoints,
a freeze, a resume), with no training: milliseconds a trace. Prints a table of every trace (how the run ended
against its budget, its steps foreseen and trained, the last LR, thread switches) and draws the LR curves of the
traces named with --plot. tests/test_budget_traces.py holds every trace to the budget's promises;
benchmarks/budget_under_load.py checks on real processes that the model of the machine is true.

    python benchmarks/budget_traces.py [--plot lull-then-load] [--out budget_traces.png]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from lmlab.core import busy, threads
from lmlab.core.busy import Load
from lmlab.core.config import TrainConfig
from lmlab.core.threads import ThreadChooser
from lmlab.train.budget import Budget, BudgetRefused, Costs, Plan, plan
from lmlab.train.schedule import Schedule, position_of
from lmlab.train.timing import EXIT_SECONDS

CORES = 2
SCALING = 0.8  # a step on n threads takes (CORES / n) ** SCALING of its time on every core: imperfect scaling
STALL = 8.0  # threads past the free cores wait at every barrier for a time slice: this many times slower


@dataclass(frozen=True)
class Trace:
    """A machine over a budget: a step's seconds on every core when quiet; the others' share of the cores from a
    share of the budget on (`load`: (from, share) pairs, in order); a step that takes `freeze` = (at share, seconds);
    noise (the steps' relative spread); evaluations and checkpoints; a kill and resume at a share of the budget."""

    name: str
    seconds: float
    step: float
    startup: float = 3.0
    load: tuple[tuple[float, float], ...] = ()
    freeze: tuple[float, float] | None = None
    noise: float = 0.0
    eval_batch: float | None = None  # default: a third of a step (a forward pass of a micro-batch, both splits)
    first_eval: float = 0.0  # what the first evaluation costs besides (a compile, a cache filled)
    plot: float = 0.1
    checkpoint: float = 0.05
    eval_interval: int = 250
    checkpoint_interval: int = 1000
    eval_iters: int = 10
    val_windows: int = 3932  # the val split the final score covers where its share holds it (the demo's)
    batch_size: int = 16
    warmup_iters: int = 20
    schedule: str = "cosine"
    resume_at: float | None = None
    lag: int = 0  # steps late the seconds spent arrive: 1 for a torchrun job's ranks, agreeing in the background
    refused: bool = False  # the budget cannot hold its minimum: refused before training

    def others(self, now: float) -> float:
        share = 0.0
        for start, others in self.load:
            if now >= start * self.seconds:
                share = others
        return share

    def step_seconds(self, now: float, threads: int) -> float:
        """A step on `threads` threads at `now`, as the load leaves the cores."""
        hogs = round(self.others(now) * CORES)
        seconds = self.step * (CORES / threads) ** SCALING
        if threads + hogs <= CORES:
            return seconds
        return seconds * (max(1.0, (threads + hogs) / CORES) if threads == 1 else STALL)


@dataclass
class Outcome:
    """What a simulated run did."""

    trace: Trace
    refused: str = ""
    planned: int = 0  # the first plan's steps
    steps: int = 0
    ended: float = 0.0  # seconds from the process's start to its exit
    warmup: int = 0
    lrs: list[float] = field(default_factory=list)
    began: list[float] = field(default_factory=list)  # seconds spent when each step began
    evaluated: list[int] = field(default_factory=list)  # the steps evaluated
    evaluation: float = 0.0  # the seconds the newest evaluation took
    threads: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)  # the plans logged as the run went (`budget` events)
    train: TrainConfig | None = None

    @property
    def miss(self) -> float:
        """How far the run ended from its budget, as a share of it."""
        return self.ended / self.trace.seconds - 1


class Clock:
    def __init__(self, now: float):
        self.now = now


class FakeMeter:
    """The load meter a chooser looks through, on the simulated clock and load."""

    def __init__(self, clock: Clock, trace: Trace):
        self.clock, self.trace, self.started = clock, trace, clock.now

    def start(self) -> FakeMeter:
        self.started = self.clock.now
        return self

    def elapsed(self) -> float:
        return self.clock.now - self.started

    def stop(self) -> Load:
        return Load(self.elapsed(), CORES, self.trace.others(self.clock.now), None)


def simulate(trace: Trace) -> Outcome:
    """The run of `trace`, its threads chosen on two faked cores."""
    with ExitStack() as stack:
        for module in (threads, busy):
            stack.enter_context(mock.patch.object(module, "cores", lambda: list(range(CORES))))
        stack.enter_context(mock.patch.dict("os.environ", {"OMP_NUM_THREADS": ""}))
        before = torch.get_num_threads()
        stack.callback(torch.set_num_threads, before)
        return _run(trace)


def _run(trace: Trace) -> Outcome:
    rng, clock = random.Random(0), Clock(trace.startup)
    train = TrainConfig(budget_seconds=trace.seconds, eval_interval=trace.eval_interval, eval_iters=trace.eval_iters,
                        checkpoint_interval=trace.checkpoint_interval, warmup_iters=trace.warmup_iters,
                        batch_size=trace.batch_size,
                        schedule=trace.schedule, learning_rate=1e-3, min_lr=1e-4)
    out = Outcome(trace, train=train)
    chooser = ThreadChooser(0, "train.threads", window=FakeMeter(clock, trace))  # type: ignore[arg-type]
    chooser.start(torch.device("cpu"))
    step_now = trace.step_seconds(clock.now, chooser.choice.threads)
    eval_batch = trace.eval_batch if trace.eval_batch is not None else step_now / 3
    clock.now += step_now * (1 + max(1, min(3, math.ceil(0.25 / step_now)))) + eval_batch + trace.plot  # the timing
    intervals = (trace.eval_interval, trace.checkpoint_interval)
    costs = Costs(step_now, eval_batch, trace.plot, trace.checkpoint, trace.plot + EXIT_SECONDS)
    try:
        made = plan(trace.seconds, clock.now, costs, train, intervals, trace.val_windows)
    except BudgetRefused as refused:
        out.refused, out.ended = str(refused), clock.now
        return out
    schedule = Schedule(train)
    schedule.budget = budget = Budget(made, intervals, lag=trace.lag)
    out.planned, out.warmup = made.max_iters, made.warmup
    frozen = resumed = False
    agreed = 0.0  # what the ranks' vote of the step before answers with

    def slowed(seconds: float) -> float:
        """What took `seconds` at the timing's pace, at the pace the cores allow now."""
        return seconds * trace.step_seconds(clock.now, chooser.choice.threads) / step_now

    def evaluate() -> None:
        out.evaluation = budget.plan.eval_iters * slowed(eval_batch) + (trace.first_eval if not out.evaluated else 0.0)
        clock.now += out.evaluation + trace.plot + trace.checkpoint
        out.evaluated.append(out.steps)

    while out.steps < schedule.last_step:
        out.began.append(clock.now)
        out.lrs.append(schedule.lr(out.steps))
        out.threads.append(chooser.choice.threads)
        seconds = trace.step_seconds(clock.now, chooser.choice.threads) * (1 + trace.noise * rng.uniform(-1, 1))
        if trace.freeze and not frozen and clock.now >= trace.freeze[0] * trace.seconds:
            seconds, frozen = trace.freeze[1], True
        clock.now += seconds
        out.steps += 1
        if out.steps % trace.eval_interval == 0 or out.steps == schedule.last_step:
            evaluate()
        elif out.steps % trace.checkpoint_interval == 0:
            clock.now += trace.checkpoint
        if trace.resume_at is not None and not resumed and clock.now >= trace.resume_at * trace.seconds:
            saved = Plan.of(budget.state_dict())  # killed after a checkpoint here; resumed by steps
            schedule.budget = budget = Budget(saved, intervals, live=False)
            clock.now, resumed = clock.now + trace.startup, True
        chooser.stepped(seconds)
        spent, agreed = (agreed, clock.now) if trace.lag else (clock.now, clock.now)
        budget.after_step(out.steps, spent)
        if budget.line:
            out.lines.append(budget.line)
        if budget.event:
            out.plans.append(budget.event)
        if out.steps == schedule.last_step and out.evaluated[-1:] != [out.steps]:
            evaluate()  # the loop's: a step decided the last only after it was taken
    windows = budget.final_windows(trace.batch_size, clock.now, out.evaluation)  # the final score
    clock.now += -(-windows // trace.batch_size) * slowed(eval_batch / 2)
    out.ended = clock.now + trace.plot + EXIT_SECONDS
    return out


def behind(out: Outcome) -> float | None:
    """The most decay left beyond the time left, as shares of the time from the warmup's end to the end the plan
    foresaw for the last step (cosine's position read back from its LR; None for wsd's flat stretch, or a run that
    never decayed)."""
    train = out.train
    assert train is not None
    if train.schedule != "cosine" or len(out.lrs) <= out.warmup + 1:
        return None
    start = out.began[out.warmup]
    end = out.trace.seconds - (out.ended - out.began[-1])  # as measured: the last step's start and the rest
    return max((1 - position_of(lr, train)) - max(0.0, end - now) / (end - start)
               for lr, now in zip(out.lrs[out.warmup:], out.began[out.warmup:]))


def traces() -> list[Trace]:
    """The table: steady machines of every pace, budgets of a few steps, load that comes, goes, or comes and goes,
    a freeze, slow evaluations, noise, both schedules, and a resume."""
    made = [Trace(f"steady {step:g} s, {seconds:g} s", seconds, step)
            for seconds, step in ((30, 0.01), (60, 0.05), (300, 0.1), (60, 0.5), (300, 2.0), (600, 30.0))]
    made += [
        Trace("three steps of 10 s", 75, 10.0, eval_interval=1000),
        Trace("two steps of 13 s", 75, 13.0, eval_interval=1000),
        Trace("21 s steps, 60 s: refused", 60, 21.0, startup=8.0, refused=True),
        Trace("a budget gone at start-up", 2, 0.05, startup=3.0, refused=True),
        Trace("eval_iters 2000 in 10 s", 10, 0.01, eval_iters=2000, eval_batch=0.01),
        Trace("slow evaluations", 60, 0.1, eval_interval=50, eval_batch=0.2),
        Trace("a slow first evaluation", 60, 0.1, eval_interval=100, first_eval=5.0),
        Trace("wsd, steady", 120, 0.1, schedule="wsd"),
        Trace("warmup longer than the run", 20, 0.2, warmup_iters=500),
        Trace("noisy steps (+-40%)", 120, 0.1, noise=0.4),
        Trace("noisy slow steps (+-40%)", 120, 2.0, noise=0.4),
        Trace("step longer than what is left", 60, 0.2, freeze=(0.9, 8.0)),
        Trace("a freeze mid-run", 120, 0.1, freeze=(0.5, 10.0)),
        Trace("a first step that compiles, the demo", 300, 0.25, startup=15.0, freeze=(0.0, 42.0), eval_batch=0.14,
              eval_iters=20, eval_interval=200, checkpoint_interval=500),
        Trace("a first step that compiles, 60 s", 60, 0.1, freeze=(0.0, 20.0)),
        Trace("torchrun ranks, a first step that compiles", 60, 0.1, freeze=(0.0, 20.0), lag=1),
        Trace("a freeze in warmup, 3 steps left", 60, 0.05, freeze=(0.07, 52.85), warmup_iters=50),
        Trace("a freeze in warmup, 1 step left", 60, 0.05, freeze=(0.07, 53.0), warmup_iters=50),
        Trace("resumed mid-plan", 120, 0.1, resume_at=0.5),
        Trace("resumed mid-plan, wsd", 120, 0.1, resume_at=0.5, schedule="wsd"),
        Trace("resumed in warmup", 60, 0.5, resume_at=0.05, warmup_iters=50),
        Trace("torchrun ranks, a step late", 10, 0.0127, startup=1.0, eval_interval=25, eval_iters=1, lag=1),
        Trace("torchrun ranks, a hog from 50%", 60, 0.2, load=((0.5, 0.5),), lag=1),
        Trace("torchrun ranks, a freeze at the end", 60, 0.2, freeze=(0.9, 8.0), lag=1),
    ]
    for at in (0.1, 0.5, 0.9):
        made += [Trace(f"a hog from {at:.0%}", 60, 0.2, load=((at, 0.5),)),
                 Trace(f"two hogs from {at:.0%}, wsd", 120, 0.1, load=((at, 1.0),), schedule="wsd")]
    made += [
        Trace("lull-then-load", 45, 0.2, load=((0.0, 0.5), (0.3, 0.0), (0.45, 0.5))),
        Trace("load then a lull", 60, 0.2, load=((0.0, 0.5), (0.5, 0.0))),
        Trace("load that comes and goes", 120, 0.1, load=tuple((i / 12, 0.5 * (i % 2)) for i in range(12))),
        Trace("slowed 5x at 60%", 60, 0.5, load=((0.6, 1.0),)),
        Trace("busy throughout", 60, 0.2, load=((0.0, 0.5),)),
        Trace("a hog and noise, 5 min", 300, 0.15, load=((0.3, 0.5),), noise=0.3),
    ]
    return made


def row(o: Outcome) -> list[str]:
    if o.refused:
        return [o.trace.name, f"{o.trace.seconds:g}", "refused", "-", "-", "-", "-", "-"]
    train = o.train
    assert train is not None
    last = (o.lrs[-1] - train.min_lr) / (train.learning_rate - train.min_lr) if o.lrs else math.nan
    switches = sum(a != b for a, b in zip(o.threads, o.threads[1:]))
    lag = behind(o)
    return [o.trace.name, f"{o.trace.seconds:g}", f"{o.ended:.1f}", f"{100 * o.miss:+.1f}%",
            f"{o.planned} / {o.steps}", f"{last:.3f}", "-" if lag is None else f"{lag:+.3f}", str(switches)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", nargs="*", default=[], help="traces whose LR curves to draw")
    parser.add_argument("--out", type=Path, default=Path("budget_traces.png"))
    args = parser.parse_args(argv)
    outcomes = [simulate(t) for t in traces()]
    header = ["trace", "budget s", "ended s", "vs budget", "steps planned / trained", "last LR (0 = min)",
              "decay behind", "thread switches"]
    widths = [max(len(r[i]) for r in [header, *map(row, outcomes)]) for i in range(len(header))]
    for cells in [header, *map(row, outcomes)]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if args.plot:
        plot([o for o in outcomes if o.trace.name in args.plot], args.out)
        print(f"LR curves: {args.out}")


def plot(outcomes: list[Outcome], path: Path) -> None:
    from lmlab.analysis.plots import pyplot

    fig, ax = pyplot().subplots(figsize=(8, 4.5), dpi=120)
    for o in outcomes:
        ax.plot(o.began, o.lrs, label=f"{o.trace.name} (steps: {o.steps})")
        ax2 = ax.twinx()
        ax2.step(o.began, o.threads, color="tab:gray", alpha=0.4, where="post", label="threads")
        ax2.set_ylabel("threads")
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("learning rate")
    ax.set_title("The LR over a budget's clock (simulated)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
