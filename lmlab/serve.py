"""An OpenAI-compatible HTTP server for a run's model: /v1/models, /v1/models/{id}, /v1/completions,
/v1/chat/completions and /health, with every request decoded in one shared batch (lmlab.batcher).

Limits: a body over --max-body-bytes gets 413 without being read whole; a prompt must fit the model's context
(its length is checked before it is tokenized, where the tokenizer bounds the characters per token); max_tokens
is capped (--max-tokens-cap); --max-batch choices decode at once and --max-queue requests wait for a row, and
the next one gets 429 with Retry-After. JSON parsing and tokenizing run off the event loop and decoding on the
batcher's thread, so a large or slow request never stalls the others; a client that goes away releases its rows
at once. Every bad request gets OpenAI's error body, never a crash; one line per request goes to stderr.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (HttpRequest, a local name)
# at run time to know what to pass them.
import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.batcher import Batcher, Event, Job, QueueFull
from lmlab.edge import ServeLimits, read_body, serve_forever
from lmlab.errors import UserError
from lmlab.generate import Batch, ChatPrompt, decode_dtype, document_start
from lmlab.generate import chat_prompt as conversation_prompt
from lmlab.model.memory import check_decoding
from lmlab.openai_api import (
    ApiError,
    chat_logprobs,
    chat_messages,
    check_fields,
    chunk,
    completion_logprobs,
    generates,
    head,
    logprobs_fields,
    model_object,
    prompt_list,
    response,
    sampling,
    shown,
    stream_fields,
    usage,
    usage_chunk,
    within_text,
)
from lmlab.rundir import LoadedRun, RunDir

ROUTES = "GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions"


@dataclass
class Served:
    """The run behind the server, its batcher and its limits. Chats go through an imported instruct model's chat
    template, the run's prompt format if it was fine-tuned, else a plain transcript (`generate.chat_prompt`)."""

    run: LoadedRun
    batcher: Batcher
    max_tokens_cap: int
    max_batch: int
    max_body_bytes: int
    created: int  # when the served checkpoint was written (the model's `created`)
    max_prompt_chars: int | None  # the longest prompt that may fit the context; None when a token has no bound
    edge: ServeLimits = ServeLimits()  # what a connection may take (lmlab.edge)

    @property
    def name(self) -> str:
        return self.run.run.name


def load_served(run_dir: Path, checkpoint: str = "best", device: str = "auto", max_tokens_cap: int = 512,
                max_batch: int = 16, max_queue: int = 64, compile: bool = False,
                max_body_bytes: int = 1_000_000, edge: ServeLimits = ServeLimits()) -> Served:
    """Load the run and start its batcher (compiling the decode step first with `compile`)."""
    from lmlab.compiled import compile_step

    limits = {"--max-tokens-cap": (max_tokens_cap, 1), "--max-batch": (max_batch, 1), "--max-queue": (max_queue, 0),
              "--max-body-bytes": (max_body_bytes, 1024)}
    for option, (value, least) in limits.items():
        if value < least:
            raise UserError(f"{option} is {value}; it must be at least {least}.")
    run = RunDir(run_dir).load(checkpoint, device)
    tokens = run.config.model.block_size + max_tokens_cap  # a row's prompt fills the context at most
    check_decoding(run.config.model, max_batch, tokens, "--max-batch", run.device)
    step = compile_step(run.model, max_batch, run.dtype) if compile else None
    batch = Batch(run.model, run.tokenizer, max_batch, decode_dtype(run.device, run.dtype, step is not None), step,
                  setting="--max-batch", tokens_per_row=tokens)
    tokenizer = run.tokenizer
    # A word tokenizer's <unk> stands for a word of any length; the others' tokens have a longest text.
    longest = None if tokenizer.kind == "word" else max(len(token) for token in tokenizer.vocab)
    block = run.config.model.block_size
    created = int((run.run.checkpoint(run.checkpoint) / "state.json").stat().st_mtime)
    return Served(run, Batcher(batch, max_queue), max_tokens_cap, max_batch, max_body_bytes, created,
                  None if longest is None else block * longest, edge)


@dataclass
class Request:
    """A validated completion request: its prompts' token ids (a completion may send several, each with its own `n`
    choices: choice i continues prompt i // n), how to sample each choice, how to answer."""

    prompts: list[list[int]]
    params: list  # SamplingParams, one per choice
    stream: bool
    include_usage: bool
    chat: bool
    texts: list[str] = field(default_factory=list)  # each prompt as text (echoed with `echo`)
    logprobs: int | None = None  # alternatives per token, when log-probabilities are asked for
    echo: bool = False
    generate: bool = True  # False: `max_tokens: 0` with `echo`, the prompts scored only

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return len(self.params) // len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def chat_prompt(served: Served, messages: Any) -> ChatPrompt:
    """Chat messages as the run's prompt (`generate.chat_prompt`: its chat template, multi-turn; its fine-tuning
    format; or a transcript); messages the template refuses get a 400 with the template's own words."""
    try:
        return conversation_prompt(served.run, chat_messages(messages))
    except UserError as err:
        raise ApiError(400, str(err), "messages")


def encode_prompt(served: Served, prompt: str, param: str = "prompt", special: bool = True) -> list[int]:
    """The prompt's token ids, refused with context_length_exceeded when they cannot fit the context, before
    tokenizing when its length alone says so; `param` is the field it came from."""
    block, tokenizer = served.run.config.model.block_size, served.run.tokenizer
    too_long = f"this model's context is {block} tokens; shorten the prompt."
    if served.max_prompt_chars is not None and len(prompt) > served.max_prompt_chars:
        raise ApiError(400, f"the prompt is {len(prompt):,} characters, more than fits: {too_long}", "prompt",
                       "context_length_exceeded")
    try:
        tokenizer.check(prompt, "the prompt" if param == "prompt" else "the chat's rendered prompt")
    except UserError as err:
        raise ApiError(400, str(err), param)
    ids = tokenizer.encode(prompt, special) if prompt else document_start(tokenizer)
    if len(ids) > block:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and {too_long}", "prompt", "context_length_exceeded")
    return ids


def parse_request(served: Served, raw: bytes, chat: bool) -> Request:
    """A request body checked and its prompt tokenized (CPU work: run it off the event loop)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}).")
    except ValueError:  # Python's limit on the digits of an integer it reads
        raise ApiError(400, "the request body holds a number of more than 4,300 digits; no field takes one.")
    except RecursionError:
        raise ApiError(400, "the request body nests JSON arrays or objects too deeply; no field of this API nests "
                       "more than a few levels.")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    check_fields(body, "chat" if chat else "completions")
    if body.get("model") not in (None, served.name):
        raise ApiError(404, f"model {shown(body.get('model'))} is not served here; use {served.name!r}.", "model",
                       "model_not_found")
    special = True
    if chat:
        rendered = chat_prompt(served, body.get("messages"))
        prompts: list[str | list[int]] = [rendered.text]
        stops, special = rendered.stop, rendered.special
    else:
        prompts, stops = prompt_list(body.get("prompt", ""), served.run.config.model.vocab_size), ()
    logprobs, echo = logprobs_fields(body, chat)
    generate = chat or generates(body, echo)
    stream, include_usage = stream_fields(body)
    params = sampling(body if generate else {**body, "max_tokens": None}, served.max_tokens_cap, served.max_batch,
                      stops, secrets.randbelow(2**63))
    if len(prompts) * len(params) > served.max_batch:
        raise ApiError(400, f"{len(prompts)} prompts × n = {len(params)} are {len(prompts) * len(params)} choices, "
                       f"more than this server decodes at once (--max-batch {served.max_batch}); send at most "
                       f"{served.max_batch // len(params)} prompts per request.", "prompt")
    field = "messages" if chat else "prompt"
    ids = [encode_prompt(served, p, field, special) if isinstance(p, str) else fitting(served, p)
           for p in prompts]
    texts = [p if isinstance(p, str) and p else served.run.tokenizer.decode(i) for p, i in zip(prompts, ids)]
    return Request(ids, [p for _ in prompts for p in params], stream, include_usage, chat, texts, logprobs, echo,
                   generate)


def fitting(served: Served, ids: list[int]) -> list[int]:
    """A prompt given as token ids, refused with context_length_exceeded when it is longer than the context."""
    block = served.run.config.model.block_size
    if len(ids) > block:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and this model's context is {block} tokens; shorten "
                       "the prompt.", "prompt", "context_length_exceeded")
    return ids


GONE = object()  # put into an answer's events when its client disconnects


class ClientGone(Exception):
    """The client of a request went away before its answer was whole."""


class Answer:
    """One request in the batcher, as the event loop sees it: events arrive through an asyncio queue, and the
    request's counts go into `stats` (its log line)."""

    def __init__(self, served: Served, request: Request, stats: dict[str, Any]):
        self.served, self.request, self.stats = served, request, stats
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(events: list[Event] | str) -> None:  # on the batcher's thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, events)
            except RuntimeError:  # the loop closed: the server is shutting down
                pass

        n = request.n
        per_choice = [request.prompts[i // n] for i in range(len(request.params))]
        self.job = Job(request.prompts[0], request.params, deliver, prompts=per_choice if len(request.prompts) > 1
                       else None, logprobs=request.logprobs, echo=request.echo, generate=request.generate)
        self.texts, self.reasons = [""] * len(request.params), [None] * len(request.params)
        # Per choice, while streaming log-probabilities: the tokens sent so far, and where the next one's text starts.
        self.scored = [0] * len(request.params)
        self.offset = [len(request.texts[i // n]) if request.texts else 0 for i in range(len(request.params))]
        self.stats["in"] = request.prompt_tokens
        try:
            served.batcher.submit(self.job)
        except QueueFull:
            raise ApiError(429, "the server is busy: the batch and its queue are full (--max-batch, --max-queue); "
                           "retry shortly.", code="server_busy", kind="rate_limit_exceeded", headers={"Retry-After": "1"})

    async def next_events(self) -> list[Event]:
        events = await self.events.get()
        if events is GONE:
            raise ClientGone
        if isinstance(events, str):
            raise ApiError(500, events, kind="server_error")
        self.stats.setdefault("first", time.perf_counter())
        for i, piece, reason in events:
            self.texts[i] += piece
            self.reasons[i] = reason
        return events

    @property
    def finished(self) -> bool:
        return all(self.reasons)

    def usage(self) -> dict[str, int]:
        self.stats["out"] = sum(c.tokens for c in self.job.choices)
        return usage(self.request.prompt_tokens, self.stats["out"])

    # -- log-probabilities, for requests that ask for them -----------------------------------------------------

    def piece(self, token: int) -> str:
        return self.served.run.tokenizer.decode([token])

    def texts_out(self) -> list[str]:
        """Each choice's text: its prompt's first with `echo`."""
        if not self.request.echo:
            return self.texts
        return [self.request.texts[i // self.request.n] + text for i, text in enumerate(self.texts)]

    def logprobs(self) -> list[dict[str, Any]] | None:
        """Each choice's `logprobs` object, once it has ended (None when not asked for): its prompt's tokens with
        `echo`, then the tokens of its text."""
        if self.request.logprobs is None:
            return None
        objects = []
        for i, choice in enumerate(self.job.choices):
            prompt = len(self.request.prompts[i // self.request.n]) if self.request.echo else 0
            scores = choice.decoding.scores
            made = within_text(scores[prompt:], self.piece, len(self.texts[i])) if self.request.generate else []
            if self.request.chat:
                objects.append(chat_logprobs(made, self.piece))
            else:
                start = 0 if self.request.echo else len(self.request.texts[i // self.request.n])
                objects.append(completion_logprobs(scores[:prompt] + made, self.piece, start))
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

    def release(self) -> None:
        """Give the rows back, whatever ended the request (a no-op once it finished)."""
        self.served.batcher.cancel(self.job)
        if not self.finished:
            self.stats["left"] = True
            self.stats["out"] = sum(c.tokens for c in self.job.choices)


async def server_sent_events(answer: Answer, top: dict[str, Any]) -> AsyncIterator[str]:
    """OpenAI's chunk objects: (chat) each choice's role, text pieces and finish reasons as they come, (with
    include_usage) a last chunk with the token counts, then [DONE]."""
    request = answer.request
    if request.include_usage:
        top = {**top, "usage": None}  # OpenAI's other chunks carry a null usage when one comes at the end
    if request.chat:
        for i in range(len(request.params)):
            yield f"data: {json.dumps(chunk(top, True, i, None, None, role=True))}\n\n"
    while not answer.finished:
        for i, piece, reason in await answer.next_events():
            logprobs = answer.streamed_logprobs(i)
            if piece or (logprobs and (logprobs.get("tokens") or logprobs.get("content"))):
                yield f"data: {json.dumps(chunk(top, request.chat, i, piece, None, logprobs=logprobs))}\n\n"
            if reason:
                yield f"data: {json.dumps(chunk(top, request.chat, i, None, reason))}\n\n"
    tokens = answer.usage()
    if request.include_usage:
        yield f"data: {json.dumps(usage_chunk(top, request.chat, tokens))}\n\n"
    yield "data: [DONE]\n\n"


async def watch_disconnect(http: Any, answer: Answer) -> None:
    """Tell `answer` when its client goes away (the body is read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    answer.events.put_nowait(GONE)


def create_app(served: Served) -> Any:
    """The ASGI application serving `served`: FastAPI routes inside a per-request log."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title=f"lmlab: {served.name}")

    class EventStream(StreamingResponse):
        """A streamed answer that gives its rows back however it ends: finished, client gone (even before the
        first chunk, when the stream never starts), or failed."""

        def __init__(self, answer: Answer, top: dict[str, Any]):
            super().__init__(server_sent_events(answer, top), media_type="text/event-stream")
            self.answer = answer

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.answer.release()

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def no_route(http: HttpRequest, err: HTTPException) -> JSONResponse:
        where = f"{http.method} {http.url.path}"
        if err.status_code == 405:
            error = ApiError(405, f"{where} is not allowed; this route takes {err.headers.get('Allow')}.",
                             code="method_not_allowed")
        else:
            error = ApiError(err.status_code, f"no route {where}; lmlab serve answers {ROUTES}.", code="not_found")
        return JSONResponse(error.body(), status_code=error.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(_: HttpRequest, err: Exception) -> JSONResponse:
        # A bug of ours still answers in OpenAI's shape, and the server keeps running.
        return JSONResponse(ApiError(500, f"internal error: {err!r}", kind="server_error").body(), status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        decoding, waiting = served.batcher.load()
        return {"status": "ok", "model": served.name, "decoding": decoding, "max_batch": served.max_batch,
                "waiting": waiting, "max_queue": served.batcher.max_queue}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(served.name, served.created)]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: str) -> dict[str, Any]:
        if model_id != served.name:
            raise ApiError(404, f"model {model_id!r} is not served here; use {served.name!r}.", "model",
                           "model_not_found")
        return model_object(served.name, served.created)

    async def answer(http: HttpRequest, chat: bool) -> Any:
        raw = await read_body(http, served.max_body_bytes, served.edge.body_timeout)
        request = await run_in_threadpool(parse_request, served, raw, chat)
        pending = Answer(served, request, http.scope.setdefault("lmlab", {}))
        top = head(chat, served.name, uuid.uuid4().hex)
        if request.stream:
            return EventStream(pending, top)
        watcher = asyncio.create_task(watch_disconnect(http, pending))
        try:
            while not pending.finished:
                await pending.next_events()
        except ClientGone:
            return Response(status_code=499)  # no one reads it; the log says the client left
        finally:
            watcher.cancel()
            pending.release()
        return JSONResponse(response(top, chat, pending.texts_out(), pending.reasons, pending.usage(),
                                     pending.logprobs()))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await answer(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await answer(http, chat=True)

    return AccessLog(app, lambda line: print(line, file=sys.stderr, flush=True))


class AccessLog:
    """ASGI middleware writing one line per request: method, path, status, tokens in and out, time to first
    token and tokens/s (for completions), seconds; `(client left)` when the client went away first."""

    def __init__(self, app: Any, write: Callable[[str], None]):
        self.app, self.write = app, write

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [499]  # nginx's "client closed request" until a status is sent
        stats = scope.setdefault("lmlab", {})

        async def noting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            seconds = time.perf_counter() - started
            parts = [scope["method"], scope["path"], str(status[0])]
            if "out" in stats:
                first = stats.get("first")
                ttft = f"{first - started:.3f}s" if first else "-"
                parts += [f"in={stats['in']}", f"out={stats['out']}", f"ttft={ttft}",
                          f"{stats['out'] / seconds:.1f} tok/s"]
            parts.append(f"{seconds:.3f}s" + (" (client left)" if stats.get("left") else ""))
            self.write(" ".join(parts))


def require_extras() -> None:
    """Fail early, before the model loads, when the `serve` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("lmlab serve needs FastAPI and uvicorn; install them with `pip install -e '.[serve]'`.")


def run_server(served: Served, sock: Any) -> None:
    """Serve until interrupted, on a socket `lmlab.edge.bind` bound before the model loaded."""
    serve_forever(create_app(served), sock, served.edge)
