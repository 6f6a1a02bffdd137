"""The CPU work of requests, off the event loop and bounded: reading and tokenizing bodies in one lane, rendering
chats through their templates in another.

A lane is a few threads and a bounded heap of waiting jobs, the smallest body first, and large bodies never take
its last thread: a flood of megabyte bodies is read one at a time, a three-token completion waits neither behind
the flood nor for one of its jobs to end, and one more job than the heap holds is refused at once (`Busy`, a 429)
instead of queueing memory without end. A chat's
template runs in a lane of its own (its renders bounded by lmlab.run.sandbox), so chats a template makes slow hold
none of the threads that read completions. After a large job the C heap's free memory goes back to the system
(`malloc_trim`): a flood's pages are not kept for good.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any

PARSE_THREADS = 2  # one job's JSON or tokenizer work beside another's; more would take cores from decoding
RENDER_THREADS = 2  # chats rendered at once, each in a worker process of lmlab.run.sandbox
MAX_WAITING = 64  # jobs a lane holds waiting, each with its body (at most --max-body-bytes)
LARGE = 64 << 10  # bytes of body from which a job is large: it may not take a lane's last free thread
TRIM_BYTES = 256 << 10  # a body this large leaves garbage worth giving back


class Busy(Exception):
    """A lane's heap is full."""


class Lane:
    """`threads` daemon threads running jobs, the cheapest waiting first, large ones on all but one of them; at
    most `max_waiting` wait."""

    def __init__(self, name: str, threads: int, max_waiting: int = MAX_WAITING):
        self.name, self.max_waiting, self.threads = name, max_waiting, threads
        self.waiting: list[tuple[int, int, Callable[[], Any], asyncio.Future]] = []
        self.large = 0  # large jobs running
        self.order = itertools.count()  # first come first served among equal costs
        self.wake = threading.Condition()
        for i in range(threads):
            threading.Thread(target=self._work, name=f"lmlab-{name}-{i}", daemon=True).start()

    async def run(self, cost: int, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on one of the lane's threads, after the waiting jobs of lower `cost` (bytes of body);
        Busy when as many jobs wait as the lane holds."""
        future = asyncio.get_running_loop().create_future()
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(self.name)
            heapq.heappush(self.waiting, (cost, next(self.order), lambda: fn(*args), future))
            self.wake.notify()
        return await future

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.waiting or (self.waiting[0][0] >= LARGE and self.large >= max(1, self.threads - 1)):
                    self.wake.wait()
                cost, _, job, future = heapq.heappop(self.waiting)
                self.large += cost >= LARGE
            try:
                outcome = (future.set_result, job())
            except BaseException as err:  # handed to the request, which answers it
                outcome = (future.set_exception, err)
            del job
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed: the server is shutting down
                pass
            del outcome
            if cost >= TRIM_BYTES:
                give_back_memory()
            if cost >= LARGE:
                with self.wake:
                    self.large -= 1
                    self.wake.notify_all()


def _settle(future: asyncio.Future, setter: Callable[[Any], None], value: Any) -> None:
    if not future.done():  # not when its request was cancelled meanwhile
        setter(value)


def give_back_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Lanes:
    """The server's two lanes: `parse` (bodies read, checked and tokenized) and `render` (chat templates)."""

    def __init__(self) -> None:
        self.parse = Lane("parse", PARSE_THREADS)
        self.render = Lane("render", RENDER_THREADS)
