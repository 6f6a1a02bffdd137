"""Continuous batching for the server: one thread decodes every admitted request together, one forward per step; a
request joins at the next step and leaves at once when it ends or is cancelled. Jobs wait in a bounded queue, first come
first served, until the batch has a row free for each choice; what a step gives every job goes out in one call of
`publish`. `use` switches to another batch (the compiled step) without stopping; `abort` ends every job at the next
step."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server imports this module before torch, to answer while the model loads
    from lmlab.inference.generate import Batch, Continuation

# (choice index, text piece, finish reason once it ended)
Event = tuple[int, str, str | None]
ABORT = "abort"  # the finish reason of a choice the server ended (vLLM's word for it)


class QueueFull(Exception):
    """The waiting queue holds as many requests as it may."""


@dataclass(eq=False)
class Job:
    """One request (its prompts, one SamplingParams per choice, the log-probabilities asked for) and who waits for
    its events (`owner`)."""

    request: Any  # its lmlab.serving.requests.Request (a module that imports this one)
    owner: Any = None
    choices: list[Continuation] = field(default_factory=list)
    batch: Batch | None = None  # the batch its choices decode in, once admitted
    cancelled: bool = False

    @property
    def rows(self) -> int:
        """Rows of the batch it holds, one per choice."""
        return len(self.request.params)

    def start(self) -> list[Event]:
        """Add every choice to its batch; the events of those that ended at once (nothing to generate)."""
        assert self.batch is not None, "a job starts once admitted to a batch"
        request = self.request  # choice i continues prompt i // n
        self.choices = [self.batch.add(request.prompts[i // request.n], params, request.logprobs, request.echo,
                                       request.generate) for i, params in enumerate(request.params)]
        return [(i, "", c.finish_reason) for i, c in enumerate(self.choices) if c.finish_reason is not None]


# A step's news: for each job, its events (or the text of an error that ended it); and when the step ended.
Publish = Callable[[list[tuple[Job, list[Event] | str]], float], None]


class Batcher:
    def __init__(self, batch: Batch, max_queue: int, publish: Publish):
        self.batch, self.max_queue, self.publish = batch, max_queue, publish
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.retiring: list[Batch] = []  # batches switched from, until their jobs end
        self.incoming: Batch | None = None
        self.aborting = False
        self.owner_of: dict[Continuation, tuple[Job, int]] = {}
        self.wake = threading.Condition()
        threading.Thread(target=self._loop, name="lmlab-batcher", daemon=True).start()

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

    def use(self, batch: Batch) -> None:
        """Decode new jobs in `batch` from the next step on; jobs running in the old one finish there."""
        with self.wake:
            self.incoming = batch
            self.wake.notify()

    def abort(self) -> None:
        """End every job, waiting or decoding, at the next step, with finish reason "abort"."""
        with self.wake:
            self.aborting = True
            self.wake.notify()

    def load(self) -> tuple[int, int]:
        """Rows held by running requests, and requests waiting."""
        with self.wake:
            return sum(job.rows for job in self.running), len(self.waiting)

    def _free(self) -> int:
        """Rows of the current batch no running job holds (a job holds a row per choice until it ends)."""
        return self.batch.capacity - sum(job.rows for job in self.running if job.batch is self.batch)

    def _queued(self) -> int:
        """Waiting jobs that the free rows cannot take, first come first served."""
        free = self._free()
        for i, job in enumerate(self.waiting):
            free -= job.rows
            if free < 0:
                return len(self.waiting) - i
        return 0

    def _loop(self) -> None:
        while True:
            with self.wake:  # what changes hands between threads changes under the lock
                self.wake.wait_for(lambda: self.waiting or self.running or self.incoming)
                if self.incoming is not None:
                    self.retiring.append(self.batch)
                    self.batch, self.incoming = self.incoming, None
                gone = [job for job in self.running if job.cancelled]
                self.running = [job for job in self.running if not job.cancelled]
                aborted = list(self.waiting) if self.aborting else []
                self.waiting = deque() if self.aborting else self.waiting
                admitted = []
                while self.waiting and self._free() >= self.waiting[0].rows:
                    admitted.append(self.waiting.popleft())
                    admitted[-1].batch = self.batch
                    self.running.append(admitted[-1])
            try:
                self._step(gone, admitted, aborted)
            except Exception as err:  # a bug of ours: every job in the batch gets the error, the server goes on
                self.publish([(job, f"internal error while decoding: {err!r}") for job in self.running],
                             time.perf_counter())
                for job in list(self.running):
                    self._end(job)

    def _step(self, gone: list[Job], admitted: list[Job], aborted: list[Job]) -> None:
        for job in gone:
            self._end(job)
        news: dict[Job, list[Event]] = {job: [(i, "", ABORT) for i in range(job.rows)] for job in aborted}
        for job in admitted:
            if ended := job.start():
                news[job] = ended
            self.owner_of.update((c, (job, i)) for i, c in enumerate(job.choices))
        if self.aborting:
            for job in list(self.running):
                news.setdefault(job, []).extend(
                    (i, c.text.flush(), ABORT) for i, c in enumerate(job.choices) if c.finish_reason is None)
                self._end(job)
        for batch in [*self.retiring, self.batch]:
            for continuation, piece in batch.step() if len(batch) else ():
                job, i = self.owner_of[continuation]
                news.setdefault(job, []).append((i, piece, continuation.finish_reason))
        self.retiring = [batch for batch in self.retiring if len(batch)]
        if news:
            self.publish(list(news.items()), time.perf_counter())
        for job in news:
            if job in self.running and all(c.finish_reason is not None for c in job.choices):
                self._end(job)

    def _end(self, job: Job) -> None:
        assert job.batch is not None, "only a started job ends"
        for continuation in job.choices:
            job.batch.drop(continuation)
            self.owner_of.pop(continuation, None)
        with self.wake:
            if job in self.running:
                self.running.remove(job)
