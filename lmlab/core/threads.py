"""How many CPU threads torch computes with: as set, else chosen from what the cores can give now, since a kernel on
every core waits for its slowest thread and one core held by another process slows every step. The rules are in
docs/reference/performance.md."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmlab.core.busy import MIN_WINDOW, Load, LoadMeter, check_threads, cores, env_threads
from lmlab.core.device import autocast

PROBE_SECONDS = 0.3  # the candidates are timed in turns for about this long
MIN_ROUNDS = 2  # and at least this many times each,
MAX_ROUNDS = 8  # but no more: every start of a job pays the timing
MARGIN = 1.1  # fewer threads win only when they are this much faster: more threads are what a quiet machine wants
LOSING = 2.0  # a count this many times slower than the best is out of the timing
PROBE_TOKENS = 512  # a probe's forward pass covers at most this many tokens, so a large model's takes no seconds
CHECK_SECONDS = 5.0  # a long job looks at the load on its cores this often
MAX_WAIT = 60.0  # and after trials undone one after another, at least this often
RECENT_STEPS = 5  # a trial's step is judged against the median of this many of the count it left


def most_threads() -> tuple[int, str | None]:
    """The threads a job may use, and what fixed them: OMP_NUM_THREADS, else the cores (None: lmlab chooses)."""
    env = env_threads()
    return (env, "OMP_NUM_THREADS") if env else (len(cores()), None)


@dataclass(frozen=True)
class Choice:
    """A job's threads and why: `reason` is the setting that fixed them, `one core`, `quiet`, `quiet again` (a trial
    of every core), `busy` (the cores others leave), `undone` (a trial that was slower) or `timed` (`seconds` by
    thread count)."""

    threads: int
    most: int
    reason: str
    seconds: dict[int, float] = field(default_factory=dict)
    load: Load | None = None
    timed: str = "a forward pass"  # what `seconds` are of: a forward pass, or a training step (the sizing's)
    how: str = "measured"  # whether `seconds` were measured now or read back (lmlab.train.machine)

    @property
    def lowered(self) -> bool:
        return self.threads < self.most

    def describe(self, override: str) -> str:
        """E.g. `1 of 2 threads: other processes used N% of the 2 cores; a forward pass took ... (train.threads sets
        them)`."""
        count = (f"{self.threads} of {self.most} threads" if self.lowered else
                 f"{self.threads} thread{'s' * (self.threads > 1)}")
        if self.reason not in ("timed", "quiet", "quiet again", "busy", "undone"):
            return f"{count} ({self.reason})"
        why = {"quiet again": ["the cores are quiet again"], "undone": ["a trial was slower"]}.get(self.reason, [])
        if self.load and self.load.others is not None:
            why.append(f"other processes used {100 * self.load.others:.0f}% of the {self.load.cores} cores")
        if self.seconds:
            timed = [f"{1000 * s:.{0 if s >= 0.01 else 1}f} ms on {n}" for n, s in sorted(self.seconds.items())]
            timed[0] += " thread" + "s" * (min(self.seconds) > 1)
            why.append(f"{self.timed} took " + ", ".join(timed))
        return f"{count}: {'; '.join(why)} ({override} sets them)"

    def record(self, step: int) -> dict[str, Any]:
        return {"event": "threads", "step": step, "threads": self.threads, "most": self.most, "reason": self.reason,
                "ms": {str(n): round(1000 * s, 3) for n, s in sorted(self.seconds.items())},
                "others": None if self.load is None or self.load.others is None else round(self.load.others, 4),
                "how": self.how if self.seconds else None}


def pick(seconds: dict[int, float]) -> int:
    """The most threads whose time is within MARGIN of the fastest."""
    best = min(seconds.values())
    return max(n for n, s in seconds.items() if s <= MARGIN * best)


def time_threads(candidates: list[int], probe: Callable[[], None]) -> dict[int, float]:
    """The mean seconds of `probe` at each thread count, timed in turns so a changing load weighs on each alike. A
    count LOSING times slower than the best is dropped: it cannot win."""
    torch.set_num_threads(min(candidates))
    probe()
    times: dict[int, list[float]] = {n: [] for n in candidates}
    racing, began = sorted(candidates), time.perf_counter()
    for rounds in range(MAX_ROUNDS):
        if len(racing) < 2 or (rounds >= MIN_ROUNDS and time.perf_counter() - began >= PROBE_SECONDS):
            break
        for n in racing:
            torch.set_num_threads(n)
            started = time.perf_counter()
            probe()
            times[n].append(time.perf_counter() - started)
        means = {n: sum(times[n]) / len(times[n]) for n in racing}
        racing = [n for n in racing if means[n] <= LOSING * min(means.values())]
    return {n: sum(t) / len(t) for n, t in times.items()}


def forward_probe(model: torch.nn.Module, rows: int, length: int, device: torch.device,
                  dtype: torch.dtype) -> Callable[[], None]:
    """A forward pass of `rows` sequences of `length` tokens (at most PROBE_TOKENS), without gradients, dropout or
    a random draw, so timing it changes nothing a run computes."""
    rows = max(1, min(rows, PROBE_TOKENS // max(1, length)))
    ids = torch.zeros(rows, min(length, PROBE_TOKENS), dtype=torch.long, device=device)

    def forward() -> None:
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(device, dtype):
                model(ids)
        finally:
            model.train(training)
    return forward


class ThreadChooser:
    """The threads of one job: made before the job sets up (that window's load tells a quiet machine), its counts
    timed once its work can be (`counts`, then `decide`: lmlab.train.machine), `stepped` after every step. `override`
    names the setting, `setting` its value (0: choose), `most` a ceiling below the cores, `fixed` a reason not to
    choose; `held` keeps the count chosen."""

    def __init__(self, setting: int, override: str, most: int = 0, fixed: str | None = None,
                 window: LoadMeter | None = None):
        check_threads(override, setting)
        cap, env = most_threads()
        self.override, self.most = override, setting or max(1, min(most or cap, cap))
        self.fixed = override if setting else env or fixed
        self.before = torch.get_num_threads()  # given back when the job ends
        torch.set_num_threads(self.most)  # whatever an earlier job of this process chose
        self.meter = window or LoadMeter().start()
        self.choice = Choice(self.most, self.most, self.fixed or "")
        self._window: Load | None = None
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._trial: tuple[Choice, float] | None = None  # the choice a trial left, and its recent steps' median
        self._wait = CHECK_SECONDS
        self.held = False

    def counts(self, device: torch.device) -> list[int]:
        """The thread counts to time a job's work on, fewest first (closes the window): every core alone where
        nothing is to be timed (set, one core, a GPU's job, a quiet machine)."""
        self._window = load = self.meter.stop()
        if device.type != "cpu" and not self.fixed:
            self.fixed = f"{device.type}: the CPU only feeds it"
        if self.fixed or self.most == 1 or (load.seconds >= MIN_WINDOW and load.others is not None and not load.busy):
            return [self.most]
        return sorted(self._candidates(load))

    def decide(self, seconds: dict[int, float], timed: str = "a training step") -> Choice:
        """The choice once `counts` were timed (`seconds` by count; empty when there was one)."""
        load = self._window
        if self.fixed:
            return self._set(Choice(self.most, self.most, self.fixed))
        if self.most == 1:
            return self._set(Choice(1, 1, "one core", load=load))
        if len(seconds) < 2:
            return self._set(Choice(self.most, self.most, "quiet", load=load))
        return self._set(Choice(pick(seconds), self.most, "timed", dict(seconds), load, timed))

    def stepped(self, seconds: float, timed: str = "a training step") -> Choice | None:
        """After a step of `seconds` (`timed` says of what): a trial undone if the step was slower than the count it
        left; else, once the wait is over, a look at the load, which may lower the threads or start a trial of more.
        The new choice, when the threads changed."""
        if self.fixed or self.held or self.most == 1:
            return None
        if self._trial is not None and seconds > self._trial[1]:
            (left, pace), self._trial = self._trial, None
            self._wait = min(MAX_WAIT, 2 * self._wait)
            tried = {self.choice.threads: seconds, left.threads: pace}
            return self._set(Choice(left.threads, self.most, "undone", tried, left.load, timed))
        self._recent.append(seconds)
        if self.meter.elapsed() < self._wait:
            return None
        if self._trial is not None:  # held until this look
            self._trial, self._wait = None, CHECK_SECONDS
        load = self.meter.stop()
        self.meter.start()
        if load.others is None:
            return None
        wanted = max(1, round(self.most * (1 - load.others))) if load.busy else self.most
        if wanted == self.choice.threads:
            return None
        # More threads stall at every barrier if the cores are taken after all: a trial, undone at its first slower
        # step. Fewer are what a load asks for, as it is: their steps are slower than the ones before the load came.
        self._trial = (self.choice, statistics.median(self._recent)) if wanted > self.choice.threads else None
        return self._set(Choice(wanted, self.most, "busy" if load.busy else "quiet again", load=load))

    def _candidates(self, load: Load) -> set[int]:
        candidates = {self.most, 1}
        if load.others is not None:
            candidates.add(max(1, round(self.most * (1 - load.others))))
        return candidates

    def _set(self, choice: Choice) -> Choice:
        if choice.threads != self.choice.threads:
            self._recent.clear()  # the steps of another count
        torch.set_num_threads(choice.threads)
        self.choice = choice
        self.meter.start()
        return choice


@dataclass
class Heard:
    """A loop other than training's whose steps `chooser`'s mid-run rule (`ThreadChooser.stepped`) hears: a decoder's,
    whose steps are `timed`; `say` is told each change of threads, once."""

    chooser: ThreadChooser
    say: Callable[[Choice], None]
    timed: str = "a decode step"

    def stepped(self, seconds: float) -> None:
        if (changed := self.chooser.stepped(seconds, self.timed)) is not None:
            self.say(changed)
