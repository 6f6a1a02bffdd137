"""The per-token path from the batcher's thread to the clients: each step's events handed to the event loop with
one wake-up for every request in the batch (`Relay`), gathered per request (`Answer`), and written as
server-sent events, every frame a stream has waiting in one write (`server_sent_events`).

What this path costs per token is what a streaming client loses of the decode step's speed (the "of step" column
of benchmarks/serve_throughput.py), so it does per step or per request what it can, and little per token: the
batcher publishes a step once, however many requests it serves; the loop, when it falls behind, takes several
steps in one wake-up; a stream writes what it has in one send. Per-token extras (a choice's logprobs) would ride
in the events (batcher.Event) and be written by `Frames`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmlab.batcher import ABORT, Event, Job
from lmlab.openai_api import ApiError, chunk, usage, usage_chunk


class ClientGone(Exception):
    """The client of a request went away before its answer was whole."""


class Relay:
    """Hands what the batcher publishes to the event loop: one `call_soon_threadsafe` for as many steps as pile
    up before the loop runs, each step then given to its requests' answers in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: deque[tuple[list[tuple[Job, list[Event] | str]], float]] = deque()
        self.scheduled = False

    def publish(self, news: list[tuple[Job, list[Event] | str]], at: float) -> None:
        """On the batcher's thread: queue a step's news and wake the loop unless a wake-up is on its way."""
        self.pending.append((news, at))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed: the server is shutting down
                pass

    def _drain(self) -> None:
        self.scheduled = False  # before taking: a step published from here on schedules a wake-up of its own
        while self.pending:
            news, at = self.pending.popleft()
            for job, events in news:
                job.owner.take(events, at)


class Answer:
    """One request as the event loop sees it: the job it submitted, the events not yet read, each choice's text
    and finish reason so far, and when its tokens came (for the metrics and the log line in `stats`)."""

    def __init__(self, prompt: list[int], params: list, stats: dict[str, Any],
                 on_tokens: Callable[[bool, int, float], None] | None = None):
        self.job = Job(prompt, params, owner=self)
        self.stats = stats  # the request's log line; "started" is when it arrived
        # Told of each step's tokens: whether they are the first, how many, and the seconds since the request's
        # previous tokens (since it arrived, for the first).
        self.on_tokens = on_tokens
        self.events: list[Event] = []
        self.error: str | None = None
        self.gone = False
        self.waiter: asyncio.Future | None = None
        self.texts, self.reasons = [""] * len(params), [None] * len(params)
        self.last = stats.get("started", time.perf_counter())
        self.stats["in"] = len(prompt)

    def take(self, events: list[Event] | str, at: float) -> None:
        """On the loop: a step's events (or the error that ended the job), at the time the step ended."""
        if isinstance(events, str):
            self.error = events
        else:
            self.events.extend(events)
            first = "first" not in self.stats
            self.stats.setdefault("first", at)
            if self.on_tokens is not None:
                self.on_tokens(first, sum(1 for _, _, reason in events if reason != ABORT), at - self.last)
            self.last = at
        self._wake()

    def leave(self) -> None:
        """The client went away: the reader stops at its next wait."""
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_events(self) -> list[Event]:
        """Every event that came since the last call, waiting for one if there is none."""
        while not (self.events or self.error or self.gone):
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        if self.gone:
            raise ClientGone
        if self.error is not None:
            raise ApiError(500, self.error, kind="server_error")
        events, self.events = self.events, []
        for i, piece, reason in events:
            self.texts[i] += piece
            self.reasons[i] = reason
        return events

    @property
    def finished(self) -> bool:
        return all(self.reasons)

    @property
    def generated(self) -> int:
        return sum(c.tokens for c in self.job.choices)

    def usage(self) -> dict[str, int]:
        self.stats["out"] = self.generated
        return usage(len(self.job.prompt), self.stats["out"])


class Frames:
    """The SSE frames of one stream: OpenAI's chunk objects (`openai_api.chunk`), the parts of a text chunk
    that never change encoded once per choice, so a token's frame encodes only its text."""

    MARK = "\x00"  # stands for the text while the fixed parts are encoded

    def __init__(self, top: dict[str, Any], chat: bool):
        self.top, self.chat = top, chat
        self.texts: dict[int, tuple[str, str]] = {}

    def text(self, i: int, piece: str) -> str:
        if i not in self.texts:
            head, tail = json.dumps(chunk(self.top, self.chat, i, self.MARK, None)).split(json.dumps(self.MARK))
            self.texts[i] = (f"data: {head}", f"{tail}\n\n")
        head, tail = self.texts[i]
        return head + json.dumps(piece) + tail

    def finish(self, i: int, reason: str) -> str:
        return f"data: {json.dumps(chunk(self.top, self.chat, i, None, reason))}\n\n"

    def of(self, events: list[Event]) -> str:
        """The frames of a step's events: a chunk for each text piece and each finish reason."""
        frames = []
        for i, piece, reason in events:
            if piece:
                frames.append(self.text(i, piece))
            if reason:
                frames.append(self.finish(i, reason))
        return "".join(frames)


async def server_sent_events(answer: Answer, top: dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk objects: (chat) each choice's role, text pieces and finish reasons as they come, (with
    include_usage) a last chunk with the token counts, then [DONE]. Each yield is all that was waiting."""
    if include_usage:
        top = {**top, "usage": None}  # OpenAI's other chunks carry a null usage when one comes at the end
    if chat:
        yield "".join(f"data: {json.dumps(chunk(top, True, i, None, None, role=True))}\n\n"
                      for i in range(len(answer.reasons)))
    frames = Frames(top, chat)
    while not answer.finished:
        waiting = frames.of(await answer.next_events())
        if waiting:
            yield waiting
    tokens = answer.usage()
    tail = f"data: {json.dumps(usage_chunk(top, chat, tokens))}\n\n" if include_usage else ""
    yield tail + "data: [DONE]\n\n"
