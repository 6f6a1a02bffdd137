"""The CPU work of requests, off the event loop and bounded: reading and tokenizing bodies in one lane, rendering chats
through their templates in another. A lane is a few threads and a bounded number of waiting jobs, shared fairly between
clients (addresses): no client runs on every thread at once, large bodies never take a lane's last thread, the next job
is the client's running fewest, a full lane makes the client with the most waiting give way (`Busy`, a 429), and a job
whose client has gone is dropped (`Left`)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PARSE_THREADS = 2  # one job's JSON or tokenizer work beside another's; more would take cores from decoding
RENDER_THREADS = 2  # chats rendered at once, each in a worker process of lmlab.run.sandbox
MAX_WAITING = 64  # jobs a lane holds waiting, each with its body (at most --max-body-bytes)
LARGE = 64 << 10  # bytes of body from which a job is large: it may not take a lane's last free thread
TRIM_BYTES = 256 << 10  # a body this large leaves garbage worth giving back


class Busy(Exception):
    """A lane is full and the job's client has as many waiting as any other, or its job gave way to another client's."""

    def __init__(self, waiting: int, mine: int):
        super().__init__(f"{waiting} waiting, {mine} of them this client's")
        self.waiting, self.mine = waiting, mine


class Left(Exception):
    """The job's client went away before the job ran: it was dropped."""


@dataclass(frozen=True)
class Client:
    """Who a job is for: `name`, the address a lane shares its threads by; `gone`, whether its connection closed."""

    name: str
    gone: Callable[[], bool] = field(default=lambda: False, compare=False)


def client_of(scope: dict[str, Any]) -> Client:
    """The client of an ASGI request: its address, and its connection's end (lmlab.serving.edge puts it there)."""
    address = scope.get("client") or ("unknown",)
    return Client(str(address[0]), scope.get(GONE, lambda: False))


GONE = "lmlab.gone"  # the scope key of a request's "has its connection closed?" (set by lmlab.serving.edge)


@dataclass(eq=False)
class _Job:
    client: Client
    cost: int
    order: int  # first come first served among a client's jobs of equal cost, and between clients
    call: Callable[[], Any]
    future: asyncio.Future

    def settle(self, setter: str, value: Any) -> None:
        """Resolve the future on its loop (from any thread); not when its request was cancelled meanwhile."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            self.future.get_loop().call_soon_threadsafe(_settle, self.future, getattr(self.future, setter), value)


class Lane:
    """`threads` daemon threads running jobs fairly between clients; at most MAX_WAITING wait."""

    def __init__(self, name: str, threads: int):
        self.name, self.threads = name, threads
        self.per_client = max(1, threads - 1)  # jobs one client may run at once: never every thread
        self.waiting: dict[str, list[tuple[int, int, _Job]]] = {}  # by client, (cost, order, job) in order
        self.count = 0  # jobs waiting
        self.running: Counter[str] = Counter()
        self.large = 0  # large jobs running
        self.order = itertools.count()
        self.wake = threading.Condition()
        for i in range(threads):
            threading.Thread(target=self._work, name=f"lmlab-{name}-{i}", daemon=True).start()

    async def run(self, client: Client, cost: int, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on one of the lane's threads, for `client`, `cost` bytes of body; Busy when the lane is full for
        this client, or when the job later gives way to another client's; Left when its client goes first."""
        job = _Job(client, cost, next(self.order), lambda: fn(*args), asyncio.get_running_loop().create_future())
        with self.wake:
            self._drop_abandoned()
            if self.count >= MAX_WAITING:
                self._make_room(client.name)
            bisect.insort(self.waiting.setdefault(client.name, []), (cost, job.order, job))
            self.count += 1
            self.wake.notify()
        return await job.future

    def load(self) -> dict[str, int]:
        with self.wake:
            return {"running": sum(self.running.values()), "waiting": self.count}

    def _make_room(self, name: str) -> None:
        """Give up the newest waiting job of the client with the most waiting, when it has more than `name` would with
        one more; else refuse `name`'s."""
        mine = len(self.waiting.get(name, ()))
        most = max(self.waiting, key=lambda c: len(self.waiting[c]), default=name)
        if len(self.waiting.get(most, ())) <= mine + 1:
            raise Busy(self.count, mine)
        jobs = self.waiting[most]
        newest = max(range(len(jobs)), key=lambda i: jobs[i][1])
        job = jobs.pop(newest)[2]
        self.count -= 1
        job.settle("set_exception", Busy(self.count + 1, len(jobs) + 1))

    def _drop_abandoned(self) -> None:
        """Drop the waiting jobs whose client went away, or whose request was cancelled."""
        for name, jobs in list(self.waiting.items()):
            for _, _, job in jobs:
                if job.client.gone() and not job.future.done():
                    job.settle("set_exception", Left())
            kept = [entry for entry in jobs if not (entry[2].future.done() or entry[2].client.gone())]
            self.count -= len(jobs) - len(kept)
            if kept:
                self.waiting[name] = kept
            else:
                del self.waiting[name]

    def _next(self) -> _Job | None:
        """The cheapest job of the client running fewest (then waiting longest) that may run one more, large ones only
        while another thread stays free; None when none may."""
        self._drop_abandoned()
        choices = [(self.running[name], jobs[0][1], name) for name, jobs in self.waiting.items()
                   if self.running[name] < self.per_client
                   and (jobs[0][0] < LARGE or self.large < max(1, self.threads - 1))]
        if not choices:
            return None
        name = min(choices)[2]
        job = self.waiting[name].pop(0)[2]
        if not self.waiting[name]:
            del self.waiting[name]
        self.count -= 1
        self.running[name] += 1
        self.large += job.cost >= LARGE
        return job

    def _work(self) -> None:
        while True:
            with self.wake:
                while (job := self._next()) is None:
                    self.wake.wait()
            call = job.call
            del job.call  # the body goes with the call, before the memory is given back
            try:
                outcome = ("set_result", call())
            except BaseException as err:  # handed to the request, which answers it
                outcome = ("set_exception", err)
            del call
            job.settle(*outcome)
            del outcome
            if job.cost >= TRIM_BYTES:
                give_back_memory()
            with self.wake:
                self.running[job.client.name] -= 1
                if not self.running[job.client.name]:
                    del self.running[job.client.name]
                self.large -= job.cost >= LARGE
                self.wake.notify_all()
            del job


def _settle(future: asyncio.Future, setter: Callable[[Any], None], value: Any) -> None:
    if not future.done():  # not when its request was cancelled meanwhile
        setter(value)


def give_back_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's malloc_trim; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)

