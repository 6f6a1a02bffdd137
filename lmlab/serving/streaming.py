"""The per-token path from the batcher's thread to the clients: each step's events handed to the event loop with one
wake-up for every request in the batch (`Relay`), gathered per request (`Answer`), and written as server-sent events,
every frame a stream has waiting in one write (`server_sent_events`). It does per step or per request what it can, and
little per token: what it costs per token is what a streaming client loses of the decode step's speed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmlab.serving.batcher import ABORT, Event, Job
from lmlab.serving.openai_api import (
    ApiError,
    chat_logprobs,
    chunk,
    completion_logprobs,
    usage,
    usage_chunk,
    within_text,
)
from lmlab.serving.requests import Request


class ClientGone(Exception):
    """The client of a request went away before its answer was whole."""


class Relay:
    """Hands what the batcher publishes to the event loop: one `call_soon_threadsafe` for as many steps as pile up
    before the loop runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: deque[tuple[list[tuple[Job, list[Event] | str]], float]] = deque()
        self.scheduled = False

    def publish(self, news: list[tuple[Job, list[Event] | str]], at: float) -> None:
        """On the batcher's thread: queue a step's news and wake the loop unless a wake-up is on its way."""
        self.pending.append((news, at))
        if not self.scheduled:
            self.scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.scheduled = False  # before taking: a step published from here on schedules a wake-up of its own
        while self.pending:
            news, at = self.pending.popleft()
            for job, events in news:
                job.owner.take(events, at)


class Answer:
    """One request as the event loop sees it: the job it submitted, the events not yet read, each choice's text and
    finish reason so far, and when its tokens came."""

    def __init__(self, request: Request, stats: dict[str, Any], piece: Callable[[int], str],
                 on_tokens: Callable[[bool, int, float], None]):
        n = request.n
        self.job = Job(request, owner=self)
        self.request, self.piece = request, piece  # piece: a token's text, for log-probabilities
        self.stats = stats  # the request's log line; "started" is when it arrived
        # Told of each step's tokens: whether they are the first, how many, and the seconds since the request's
        # previous tokens (since it arrived, for the first).
        self.on_tokens = on_tokens
        self.events: list[Event] = []
        self.error: str | None = None
        self.gone = False
        self.waiter: asyncio.Future | None = None
        self.texts = [""] * len(request.params)
        self.reasons: list[str | None] = [None] * len(request.params)
        # Per choice, while streaming log-probabilities: the tokens sent so far, and where the next one's text starts.
        self.scored = [0] * len(request.params)
        self.offset = [len(request.texts[i // n]) if request.texts else 0 for i in range(len(request.params))]
        self.last = stats.get("started", time.perf_counter())
        self.stats["in"] = request.prompt_tokens

    def take(self, events: list[Event] | str, at: float) -> None:
        """On the loop: a step's events (or the error that ended the job), at the time the step ended."""
        if isinstance(events, str):
            self.error = events
        else:
            self.events.extend(events)
            first = "first" not in self.stats
            self.stats.setdefault("first", at)
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
        return usage(self.request.prompt_tokens, self.stats["out"])

    # -- log-probabilities, for requests that ask for them -----------------------------------------------------

    def texts_out(self) -> list[str]:
        """Each choice's text: its prompt's first with `echo`."""
        if not self.request.echo:
            return self.texts
        return [self.request.texts[i // self.request.n] + text for i, text in enumerate(self.texts)]

    def logprobs(self) -> list[dict[str, Any]] | None:
        """Each choice's `logprobs` object, once it has ended (None when not asked for)."""
        request = self.request
        if request.logprobs is None:
            return None
        objects = []
        for i, choice in enumerate(self.job.choices):
            text = request.texts[i // request.n]
            prompt = len(request.prompts[i // request.n]) if request.echo else 0
            scores = choice.decoding.scores
            made = within_text(scores[prompt:], self.piece, len(self.texts[i])) if request.generate else []
            if request.chat:
                objects.append(chat_logprobs(made, self.piece))
            else:
                # An empty prompt's tokens are the start of a document it stands for, not text to echo.
                echoed = scores[:prompt] if text else []
                objects.append(completion_logprobs(echoed + made, self.piece, 0 if request.echo else len(text)))
        return objects

    def streamed_logprobs(self, i: int) -> dict[str, Any] | None:
        """The `logprobs` object of choice i's tokens generated since its last chunk (None when not asked for)."""
        if self.request.logprobs is None:
            return None
        scores = self.job.choices[i].decoding.scores
        new, self.scored[i] = scores[self.scored[i]:], len(scores)
        if self.request.chat:
            return chat_logprobs(new, self.piece)
        made = completion_logprobs(new, self.piece, self.offset[i])
        self.offset[i] += sum(map(len, made["tokens"]))
        return made


def event(data: Any) -> str:
    """One server-sent event of `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n"


def frames(events: list[Event], answer: Answer, top: dict[str, Any], texts: list[list[str]]) -> str:
    """The SSE frames of a step's events: a chunk for each text piece (with its tokens' log-probabilities when asked)
    and each finish reason. `texts`: each choice's text chunk split around its text, the parts that never change
    encoded once per stream."""
    chat, out = answer.request.chat, []
    for i, piece, reason in events:
        logprobs = answer.streamed_logprobs(i)
        if logprobs is not None and (piece or logprobs.get("tokens") or logprobs.get("content")):
            out.append(event(chunk(top, chat, i, piece, None, logprobs=logprobs)))
        elif piece:
            head, tail = texts[i]
            out.append(f"data: {head}{json.dumps(piece)}{tail}\n\n")
        if reason:
            out.append(event(chunk(top, chat, i, None, reason)))
    return "".join(out)


async def server_sent_events(answer: Answer, top: dict[str, Any]) -> AsyncIterator[str]:
    """OpenAI's chunk objects: (chat) each choice's role, text pieces and finish reasons, (with include_usage) a last
    chunk with the token counts, then [DONE]. Each yield is all that was waiting."""
    chat, include_usage = answer.request.chat, answer.request.include_usage
    if include_usage:
        top = {**top, "usage": None}  # OpenAI's other chunks carry a null usage when one comes at the end
    if chat:
        yield "".join(event(chunk(top, True, i, None, None, role=True)) for i in range(len(answer.reasons)))
    mark = json.dumps("\x00")  # stands for the text while a text chunk's other parts are encoded
    texts = [json.dumps(chunk(top, chat, i, "\x00", None)).split(mark) for i in range(len(answer.reasons))]
    while not answer.finished:
        waiting = frames(await answer.next_events(), answer, top, texts)
        if waiting:
            yield waiting
    tokens = answer.usage()
    tail = event(usage_chunk(top, chat, tokens)) if include_usage else ""
    yield tail + "data: [DONE]\n\n"
