"""How many CPU threads torch computes with: as set, else the cores other processes leave free now, since a kernel on
every core waits for its slowest thread and one core held by another process slows every step; then, mid-job, as
the load changes. One rule for training, decoding and serving; docs/reference/performance.md gives it."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core.busy import MIN_WINDOW, Load, LoadMeter, check_threads, cores, env_threads

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
    of every core), `busy` (the cores others leave) or `undone` (a trial whose step was slower)."""

    threads: int
    most: int
    reason: str
    load: Load | None = None
    slower: tuple[float, float] | None = None  # an undone trial's step and the one before it, in seconds
    timed: str = "a training step"  # what `slower` times

    @property
    def lowered(self) -> bool:
        return self.threads < self.most

    def describe(self, override: str) -> str:
        """E.g. `1 of 2 threads: other processes used 47% of the 2 cores (train.threads sets them)`."""
        count = (f"{self.threads} of {self.most} threads" if self.lowered else
                 f"{self.threads} thread{'s' * (self.threads > 1)}")
        if self.reason not in ("quiet", "quiet again", "busy", "undone"):
            return f"{count} ({self.reason})"
        why = {"quiet again": ["the cores are quiet again"]}.get(self.reason, [])
        if self.slower:
            why.append(f"a trial was slower: {self.timed} took {1000 * self.slower[0]:.1f} ms, "
                       f"{1000 * self.slower[1]:.1f} ms before it")
        if self.load and self.load.others is not None:
            why.append(f"other processes used {100 * self.load.others:.0f}% of the {self.load.cores} cores")
        return f"{count}: {'; '.join(why) or 'the cores are quiet'} ({override} sets them)"

    def record(self, step: int) -> dict[str, Any]:
        return {"event": "threads", "step": step, "threads": self.threads, "most": self.most, "reason": self.reason,
                "others": None if self.load is None or self.load.others is None else round(self.load.others, 4)}


class ThreadChooser:
    """The threads of one job: made before the job sets up (that window's load tells a quiet machine from a busy one),
    chosen once its work can start (`start`), then after every step (`stepped`). `override` names the setting,
    `setting` its value (0: choose), `most` a ceiling below the cores, `fixed` a reason not to choose; `held` keeps
    the count chosen."""

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
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._trial: tuple[Choice, float] | None = None  # the choice a trial left, and its recent steps' median
        self._wait = CHECK_SECONDS
        self.held = False

    def start(self, device: torch.device) -> Choice:
        """The threads the job's work starts on (closes the start's window): as set, every core on one core or for a
        GPU's job, else those the load of the window leaves free."""
        load = self.meter.stop()
        if device.type != "cpu" and not self.fixed:
            self.fixed = f"{device.type}: the CPU only feeds it"
        if self.fixed:
            return self._set(Choice(self.most, self.most, self.fixed))
        if self.most == 1:
            return self._set(Choice(1, 1, "one core", load))
        threads = self.free(load)
        return self._set(Choice(threads, self.most, "busy" if threads < self.most else "quiet", load))

    def free(self, load: Load) -> int:
        """The threads `load` leaves: the cores others leave on a busy machine, else every one (a window too short
        to tell included: the mid-run rule hears the load later)."""
        if not load.busy or load.others is None or load.seconds < MIN_WINDOW:
            return self.most
        return max(1, round(self.most * (1 - load.others)))

    def stepped(self, seconds: float, timed: str = "a training step") -> Choice | None:
        """After a step of `seconds` (`timed` says of what): a trial undone if the step was slower than the count it
        left; else, once the wait is over, a look at the load, which may lower the threads or start a trial of more.
        The new choice, when the threads changed."""
        if self.fixed or self.held or self.most == 1:
            return None
        if self._trial is not None and seconds > self._trial[1]:
            (left, pace), self._trial = self._trial, None
            self._wait = min(MAX_WAIT, 2 * self._wait)
            return self._set(Choice(left.threads, self.most, "undone", left.load, (seconds, pace), timed))
        self._recent.append(seconds)
        if self.meter.elapsed() < self._wait:
            return None
        if self._trial is not None:  # held until this look
            self._trial, self._wait = None, CHECK_SECONDS
        load = self.meter.stop()
        self.meter.start()
        if load.others is None:
            return None
        wanted = self.free(load)
        if wanted == self.choice.threads:
            return None
        # More threads stall at every barrier if the cores are taken after all: a trial, undone at its first slower
        # step. Fewer are what a load asks for, as it is: their steps are slower than the ones before the load came.
        self._trial = (self.choice, statistics.median(self._recent)) if wanted > self.choice.threads else None
        return self._set(Choice(wanted, self.most, "busy" if load.busy else "quiet again", load))

    def restore(self) -> None:
        """torch's threads given back as they were before the job (a notebook, a script go on in this process)."""
        torch.set_num_threads(self.before)

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
