"""Continuous batching for the server: one thread decodes every admitted request together, one forward per step
for all of them; a request that arrives while others decode joins at the next step, and one that ends or is
cancelled leaves at once.

Requests (jobs) wait in a bounded queue, first come first served, until the batch has a row free for each of
their choices; `submit` refuses one beyond the queue. Each job's text comes back through its `deliver`
callback, once per step, on the batcher's thread. Cancelling is deterministic: a waiting job leaves the queue at
once, a decoding one the batch before the next step, whatever the caller's garbage collector does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lmlab.config import SamplingParams
from lmlab.generate import Batch, Continuation

# (choice index, text piece, finish reason once it ended); a list of these per step, or None with an error text
Event = tuple[int, str, str | None]


class QueueFull(Exception):
    """The waiting queue holds as many requests as it may."""


@dataclass(eq=False)
class Job:
    """One request: its prompt, one SamplingParams per choice, and where its events go. A request with a list
    of prompts gives each choice its own (`prompts`, one per choice); `logprobs`, `echo` and `generate` are
    `Batch.add`'s, the same for every choice."""

    prompt: list[int]
    params: list[SamplingParams]
    deliver: Callable[[list[Event] | str], None]  # a step's events, or the text of an error that ended the job
    choices: list[Continuation] = field(default_factory=list)
    cancelled: bool = False
    prompts: list[list[int]] | None = None
    logprobs: int | None = None
    echo: bool = False
    generate: bool = True

    def start(self, batch: Batch) -> list[Event]:
        """Add every choice to the batch; the events of those that ended at once (nothing to generate)."""
        self.choices = [batch.add(self.prompts[i] if self.prompts else self.prompt, params, self.logprobs,
                                  self.echo, self.generate) for i, params in enumerate(self.params)]
        return [(i, "", c.finish_reason) for i, c in enumerate(self.choices) if c.finish_reason is not None]


class Batcher:
    def __init__(self, batch: Batch, max_queue: int):
        self.batch, self.max_queue = batch, max_queue
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="lmlab-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` to join the batch at the next step; QueueFull when it would wait behind `max_queue` others
        for a row (a job the free rows can take does not count as waiting)."""
        with self.wake:
            self.waiting.append(job)
            if self._queued() > self.max_queue:
                self.waiting.pop()
                raise QueueFull
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job` (its client went away); a no-op once it has ended."""
        with self.wake:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            self.wake.notify()

    def load(self) -> tuple[int, int]:
        """Rows held by running requests, and requests waiting."""
        with self.wake:
            return self.batch.capacity - self._free(), len(self.waiting)

    def _free(self) -> int:
        """Rows no running job holds. A job holds a row per choice from the moment it is admitted until it ends
        (even choices that ended early), so a job admitted here always finds its rows free in the batch."""
        return self.batch.capacity - sum(len(job.params) for job in self.running)

    def _queued(self) -> int:
        """Waiting jobs that the free rows cannot take, first come first served."""
        free = self._free()
        for i, job in enumerate(self.waiting):
            free -= len(job.params)
            if free < 0:
                return len(self.waiting) - i
        return 0

    def _loop(self) -> None:
        while True:
            with self.wake:  # what changes hands between threads changes under the lock
                while not self.waiting and not self.running:
                    self.wake.wait()
                gone = [job for job in self.running if job.cancelled]
                for job in gone:
                    self.running.remove(job)
                admitted = []
                while self.waiting and self._free() >= len(self.waiting[0].params):
                    admitted.append(self.waiting.popleft())
                    self.running.append(admitted[-1])
            try:
                self._step(gone, admitted)
            except Exception as err:  # a bug of ours: every job in the batch gets the error, the server goes on
                for job in list(self.running):
                    job.deliver(f"internal error while decoding: {err!r}")
                    self._end(job)

    def _step(self, gone: list[Job], admitted: list[Job]) -> None:
        for job in gone:
            self._end(job)
        events: dict[Job, list[Event]] = {}
        for job in admitted:
            if ended := job.start(self.batch):
                events[job] = ended
        if len(self.batch):
            index = {c: (job, i) for job in self.running for i, c in enumerate(job.choices)}
            for continuation, piece in self.batch.step():
                job, i = index[continuation]
                events.setdefault(job, []).append((i, piece, continuation.finish_reason))
        for job, job_events in events.items():
            job.deliver(job_events)
            if all(c.finish_reason is not None for c in job.choices):
                self._end(job)

    def _end(self, job: Job) -> None:
        for continuation in job.choices:
            self.batch.drop(continuation)
        with self.wake:
            if job in self.running:
                self.running.remove(job)
