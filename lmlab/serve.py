"""An OpenAI-compatible HTTP server for a run's model: /v1/models, /v1/completions, /v1/chat/completions.

Limits: a prompt must fit the model's context (block_size tokens); max_tokens is capped (--max-tokens-cap);
at most --max-concurrent requests generate at once and the next one gets 429 at once rather than queueing
behind CPU-bound work. Every bad request gets a 400 with OpenAI's error body, never a crash.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (HttpRequest, a local name)
# at run time to know what to pass them.
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.config import SamplingParams
from lmlab.errors import UserError
from lmlab.generate import TextStream, document_start
from lmlab.rundir import LoadedRun, RunDir


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """The run behind the server and its limits. Chats go through the run's prompt format if it was fine-tuned,
    else they are rendered as a plain transcript."""

    run: LoadedRun
    max_tokens_cap: int
    slots: threading.BoundedSemaphore

    @property
    def name(self) -> str:
        return self.run.run.name


def load_served(run_dir: Path, checkpoint: str = "best", device: str = "auto", max_tokens_cap: int = 512,
                max_concurrent: int = 2) -> Served:
    if max_tokens_cap < 1 or max_concurrent < 1:
        raise UserError("--max-tokens-cap and --max-concurrent must be at least 1.")
    return Served(RunDir(run_dir).load(checkpoint, device), max_tokens_cap, threading.BoundedSemaphore(max_concurrent))


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, low: float | None = None,
           high: float | None = None) -> Any:
    """A request field checked for type and range; a 400 naming it otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"`{name}` must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}.", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"`{name}` is {value}; it must be between {low} and {high}.", name)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "`stop` must be a string or a list of at most 4 strings.", "stop")
    return stops


@dataclass
class Request:
    """A validated completion request: the prompt's token ids and how to sample."""

    ids: list[int]
    params: SamplingParams
    stream: bool


# OpenAI fields this server does not implement, with the value that means "not used"; any other value is a
# 400 rather than an answer that silently ignores what was asked.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None,), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "response_format": (None,)}


def parse_request(served: Served, body: Any, prompt: str, stop: list[str]) -> Request:
    """Check the sampling fields shared by both endpoints and encode the prompt within the context."""
    for name, unused in UNSUPPORTED.items():
        if body.get(name) not in unused:
            raise ApiError(400, f"`{name}` is not supported by lmlab serve; leave it out.", name, "unsupported")
    if _field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "`n` must be 1: this server returns one choice per request.", "n")
    max_tokens = _field(body, "max_tokens", (int,), min(256, served.max_tokens_cap), 1, served.max_tokens_cap)
    tokenizer = served.run.tokenizer
    try:
        tokenizer.check(prompt, "the prompt")
    except UserError as err:
        raise ApiError(400, str(err), "prompt")
    ids = tokenizer.encode(prompt) if prompt else document_start(tokenizer)
    block = served.run.config.model.block_size
    if len(ids) > block:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but this model's context is {block}; shorten it.",
                       "prompt", "context_length_exceeded")
    seed = _field(body, "seed", (int,), None)
    try:
        params = SamplingParams(max_tokens, float(_field(body, "temperature", (int, float), 1.0, 0, 2)),
                                _field(body, "top_k", (int,), None, 1),
                                float(_field(body, "top_p", (int, float), 1.0, 1e-6, 1)),
                                secrets.randbelow(2**31) if seed is None else seed, (*stop, *_stop(body)))
    except UserError as err:  # a value no type check catches, such as NaN or a seed beyond 64 bits
        raise ApiError(400, str(err))
    return Request(ids, params, _field(body, "stream", (bool,), False))


def chat_prompt(served: Served, messages: Any) -> tuple[str, list[str]]:
    """Render chat messages: through the fine-tuning format (the last user message is the instruction, the
    format being single-turn), else as a `role: content` transcript ending with `assistant:`."""
    roles = ("system", "user", "assistant")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "`messages` must be a non-empty list of {role: system|user|assistant, content: text}.",
                       "messages")
    fmt = served.run.prompt_format
    if fmt is not None:
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError(400, "`messages` needs a user message: it is the instruction.", "messages")
        return fmt.render(users[-1]), [fmt.end]
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return transcript, ["\nuser:"]


def _usage(request: Request, stream: TextStream) -> dict[str, int]:
    n = len(request.ids)
    return {"prompt_tokens": n, "completion_tokens": stream.tokens, "total_tokens": n + stream.tokens}


class _Events:
    """The server-sent events of one streamed response. Its concurrency slot goes back exactly once: when the
    stream ends, or when the response is dropped, as it is if the client leaves before the first chunk (the
    generator then never starts, so a `finally` in it would never run)."""

    def __init__(self, chunks: Iterator[dict[str, Any]], slot: threading.BoundedSemaphore):
        self.chunks, self.slot, self.released = chunks, slot, False

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self.chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot.release()

    __del__ = release


def complete(served: Served, request: Request, chat: bool) -> dict[str, Any] | _Events:
    """Run one request: the whole response, or server-sent events when it asked to stream."""
    if not served.slots.acquire(blocking=False):
        raise ApiError(429, "the server is busy with as many requests as --max-concurrent allows; retry shortly.",
                       code="server_busy", kind="rate_limit_exceeded")
    run = served.run
    stream = TextStream(run.model, run.tokenizer, request.ids, request.params, run.dtype)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": served.name}
    if request.stream:
        return _Events(_chunks(head, stream, chat), served.slots)
    try:
        text = stream.text()
    finally:
        served.slots.release()
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stream.finish_reason}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(request, stream)}


def _chunks(head: dict[str, Any], stream: TextStream, chat: bool) -> Iterator[dict[str, Any]]:
    """OpenAI's chunk objects: text pieces, then one with the finish reason."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
            return {**head, "object": kind, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**head, "object": kind, "choices": [{"index": 0, "text": piece or "", "logprobs": None,
                                                     "finish_reason": finish}]}

    if chat:
        yield chunk(None, None, role=True)
    for piece in stream:
        yield chunk(piece, None)
    yield chunk(None, stream.finish_reason)


def create_app(served: Served) -> Any:
    """The FastAPI application serving `served`."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"lmlab: {served.name}")

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def server_error(_: HttpRequest, err: Exception) -> JSONResponse:
        # A bug of ours still answers in OpenAI's shape, and the server keeps running.
        return JSONResponse(ApiError(500, f"internal error: {err!r}", kind="server_error").body(), status_code=500)

    async def read_body(http: HttpRequest) -> dict[str, Any]:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err}).")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        if body.get("model") not in (None, served.name):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; use {served.name!r}.", "model",
                           "model_not_found")
        return body

    def respond(result: dict[str, Any] | _Events) -> Any:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "lmlab"}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        body = await read_body(http)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "`prompt` must be a string (or a list of one string).", "prompt")
        request = parse_request(served, body, prompt, [])
        return respond(await _in_thread(complete, served, request, False))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        body = await read_body(http)
        prompt, stops = chat_prompt(served, body.get("messages"))
        request = parse_request(served, body, prompt, stops)
        return respond(await _in_thread(complete, served, request, True))

    return app


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Generation is CPU/GPU-bound: run it off the event loop so other requests are still answered."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def require_extras() -> None:
    """Fail early, before the model loads, when the `serve` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("lmlab serve needs FastAPI and uvicorn; install them with `pip install -e '.[serve]'`.")


def run_server(served: Served, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(create_app(served), host=host, port=port, log_level="warning")
