"""An OpenAI-compatible HTTP server for a run's model: /v1/models, /v1/models/{id}, /v1/completions and
/v1/chat/completions; vLLM's /tokenize and /detokenize; /health and Prometheus' /metrics. Every request is
decoded in one shared batch (lmlab.serving.batcher), its tokens handed to the clients by lmlab.serving.streaming.

The port is bound at once, before torch is imported (lmlab.serving.edge: a port in use is said before anything loads),
and answers at once: until the model is ready /health answers 503 with the phase of the start (lmlab.serving.startup
loads it in the background) and the API 503 `model_loading` with Retry-After. lmlab.serving.edge's limits (connections,
header, body and idle timeouts) hold from the first connection. With
an API key every route but /health and /metrics wants `Authorization: Bearer KEY`. A first SIGTERM or SIGINT
drains: the port closes, running requests go on for up to --drain-seconds, then each ends with a last chunk
(finish reason "abort") and the process exits 0; a second signal ends it at once.

Limits: a body over --max-body-bytes gets 413 without being read whole (408 when it does not arrive within
--body-timeout); a prompt must fit the model's context
(its length is checked before it is tokenized, where the tokenizer bounds the characters per token); max_tokens
is capped (--max-tokens-cap); --max-batch choices decode at once and --max-queue requests wait for a row, and
the next one gets 429 with Retry-After. JSON parsing and tokenizing run off the event loop and decoding on the
batcher's thread, so a large or slow request never stalls the others; a client that goes away releases its rows
at once. Every bad request gets OpenAI's error body, never a crash; one line per request goes to stderr.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (HttpRequest, a local name)
# at run time to know what to pass them.
import asyncio
import ipaddress
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.serving.batcher import QueueFull
from lmlab.serving.edge import ServeLimits, protocol, read_body
from lmlab.core.errors import UserError
from lmlab.serving.openai_api import ApiError, head, model_object, response
from lmlab.serving.metrics import CONTENT_TYPE, Metrics
from lmlab.serving.requests import (
    Served,
    detokenize_request,
    parse_request,
    tokenize_request,
)
from lmlab.serving.streaming import Answer, ClientGone, Relay, server_sent_events

ROUTES = ("GET /health, GET /metrics, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, "
          "POST /v1/chat/completions, POST /tokenize and POST /detokenize")
OPEN = ("/health", "/metrics")  # answered without the API key: health checks and scrapers have none
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
             "/detokenize")


@dataclass
class ServeOptions:
    """What `lmlab serve` is asked to serve, and how."""

    run: Path
    checkpoint: str = "best"
    device: str = "auto"
    max_tokens_cap: int = 512
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1_000_000
    compile: bool = False
    threads: int = 0  # CPU threads of the decode step; 0: one fewer than the cores (see decode_threads)

    def check(self) -> None:
        limits = {"--max-tokens-cap": (self.max_tokens_cap, 1), "--max-batch": (self.max_batch, 1),
                  "--max-queue": (self.max_queue, 0), "--max-body-bytes": (self.max_body_bytes, 1024),
                  "--threads": (self.threads, 0)}
        for option, (value, least) in limits.items():
            if value < least:
                raise UserError(f"{option} is {value}; it must be at least {least}.")
        if not (self.run / "config.toml").is_file():  # said before the port opens (RunDir.config's words)
            raise UserError(f"{self.run} is not an lmlab run (no config.toml); pass a directory made by "
                            "`lmlab train`, `lmlab finetune` or `lmlab import-hf`.")


@dataclass
class State:
    """The server from its first moment: its names and key, the phase of its start (the run once served), the
    decode step in use, whether it drains, and its metrics. `start` (given the state) begins loading once the
    port is open."""

    names: list[str]  # the model ids it answers to; the first is the one it answers with
    api_key: str | None
    start: Callable[["State"], None]
    edge: ServeLimits = ServeLimits()  # what a connection may take (lmlab.serving.edge)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    stop: Callable[[], None] = lambda: None  # ends the server (once it runs)
    phase: str = "starting"
    served: Served | None = None
    decode_step: str = "eager"
    threads: int = 0  # the decode step's CPU threads, once loaded
    draining: bool = False
    failure: str | None = None  # why loading failed: the server stops, and the command says it
    relay: Relay | None = None
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.live)

    @property
    def name(self) -> str:
        return self.names[0]

    def live(self) -> dict[str, Any]:
        decoding, waiting = self.served.batcher.load() if self.served else (0, 0)
        info = {"model": self.name, "phase": self.phase, "decode_step": self.decode_step}
        if self.served:
            info |= {"run": str(self.served.run.run.path), "checkpoint": self.served.run.checkpoint,
                     "step": str(self.served.run.step), "max_model_len": str(self.served.context)}
        return {"decoding": decoding, "waiting": waiting, "max_batch": self.served.max_batch if self.served else 0,
                "ready": int(self.served is not None and not self.draining), "info": info}


def loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve beyond this machine
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse an empty key, and a server beyond loopback without one unless `insecure` says so."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key (or set LMLAB_API_KEY), or leave it out to serve without one.")
    if api_key is None and not insecure and not loopback(host):
        raise UserError(f"--host {host} serves beyond this machine, and without --api-key anyone who reaches it can "
                        "use the model; give --api-key KEY (or set LMLAB_API_KEY), or --insecure if that is meant.")


def unauthorized(headers: dict[bytes, bytes], api_key: str) -> ApiError | None:
    """The 401 for a request without `Bearer api_key` (OpenAI's error body), or None."""
    given = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = given.partition(" ")
    if not given:
        message = "no API key given; send it as `Authorization: Bearer KEY` (the openai client's api_key)."
    elif scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        message = "the API key given is not this server's (--api-key); check the key sent as `Authorization: Bearer KEY`."
    else:
        return None
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(state: State) -> Any:
    """The ASGI application of `state`: FastAPI routes behind the gate (key, loading, draining) and the log."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title=f"lmlab: {state.name}")

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
                release(self.answer)

    def release(answer: Answer) -> None:
        """Give the rows back, whatever ended the request (a no-op once it finished)."""
        state.served.batcher.cancel(answer.job)
        if not answer.finished:
            answer.stats["left"] = True
            answer.stats["out"] = answer.generated

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
    async def health() -> JSONResponse:
        served = state.served
        if state.draining or served is None:
            status = "draining" if state.draining else "loading"
            return JSONResponse({"status": status, "phase": state.phase, "model": state.name}, status_code=503)
        decoding, waiting = served.batcher.load()
        return JSONResponse({"status": "ok", "model": state.name, "decode_step": state.decode_step,
                             "threads": state.threads, "decoding": decoding, "max_batch": served.max_batch,
                             "waiting": waiting, "max_queue": served.batcher.max_queue})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = state.served
        return {"object": "list", "data": [model_object(name, served.created, served.context) for name in state.names]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in state.names:
            raise ApiError(404, f"model {model_id!r} is not served here; use {state.name!r}.", "model",
                           "model_not_found")
        return model_object(model_id, state.served.created, state.served.context)

    def piece(token: int) -> str:
        """A token's text, as log-probabilities name it."""
        return state.served.run.tokenizer.decode([token])

    async def answer(http: HttpRequest, chat: bool) -> Any:
        served = state.served
        raw = await read_body(http, served.max_body_bytes, state.edge.body_timeout)
        request = await run_in_threadpool(parse_request, served, state.names, raw, chat)
        pending = Answer(request, http.scope.setdefault("lmlab", {}), piece, state.metrics.tokens)
        try:
            served.batcher.submit(pending.job)
        except QueueFull:
            raise ApiError(429, "the server is busy: the batch and its queue are full (--max-batch, --max-queue); "
                           "retry shortly.", code="server_busy", kind="rate_limit_exceeded", headers={"Retry-After": "1"})
        state.metrics.prompt_tokens.inc(request.prompt_tokens)
        top = head(chat, state.name, uuid.uuid4().hex)
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
            release(pending)
        return JSONResponse(response(top, chat, pending.texts_out(), pending.reasons, pending.usage(),
                                     pending.logprobs()))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await answer(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await answer(http, chat=True)

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest) -> Any:
        raw = await read_body(http, state.served.max_body_bytes, state.edge.body_timeout)
        return await run_in_threadpool(tokenize_request, state.served, state.names, raw)

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest) -> Any:
        raw = await read_body(http, state.served.max_body_bytes, state.edge.body_timeout)
        return await run_in_threadpool(detokenize_request, state.served, state.names, raw)

    return AccessLog(Gate(app, state), state)


async def watch_disconnect(http: Any, answer: Answer) -> None:
    """Tell `answer` when its client goes away (the body is read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    answer.leave()


async def send_error(send: Any, error: ApiError) -> None:
    """An ApiError as a whole response, sent from ASGI middleware (before any route runs)."""
    import json

    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware in front of the routes: the API key (every route but /health and /metrics), then 503 for
    the API while the model loads (`model_loading`) or once the server drains (`shutting_down`), with
    Retry-After, before a body is read."""

    def __init__(self, app: Any, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN:
            return await self.app(scope, receive, send)
        state = self.state
        error = unauthorized(dict(scope["headers"]), state.api_key) if state.api_key else None
        if error is None and state.served is None:
            error = ApiError(503, f"the model is loading ({state.phase}); retry shortly.", code="model_loading",
                             kind="server_error", headers={"Retry-After": "1"})
        if error is None and state.draining:
            error = ApiError(503, "the server is shutting down and takes no new requests; send it to another.",
                             code="shutting_down", kind="server_error", headers={"Connection": "close"})
        if error is None:
            return await self.app(scope, receive, send)
        await send_error(send, error)


def endpoint(path: str) -> str:
    """The route a path is counted under in the metrics (unknown paths together, so they add no series)."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class AccessLog:
    """ASGI middleware writing one line per request (method, path, status, tokens in and out, time to first
    token and tokens/s for completions, seconds; `(client left)` when the client went away first) and counting it
    in the metrics."""

    def __init__(self, app: Any, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [499]  # nginx's "client closed request" until a status is sent
        stats = scope.setdefault("lmlab", {"started": started})

        async def noting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            seconds = time.perf_counter() - started
            self.state.metrics.requests.labels(endpoint(scope["path"]), str(status[0])).inc()
            parts = [scope["method"], scope["path"], str(status[0])]
            if "out" in stats:
                self.state.metrics.duration.observe(seconds)
                first = stats.get("first")
                ttft = f"{first - started:.3f}s" if first else "-"
                parts += [f"in={stats['in']}", f"out={stats['out']}", f"ttft={ttft}",
                          f"{stats['out'] / seconds:.1f} tok/s"]
            parts.append(f"{seconds:.3f}s" + (" (client left)" if stats.get("left") else ""))
            self.state.log(" ".join(parts))


def require_extras() -> None:
    """Fail early, before the model loads, when the `serve` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("lmlab serve needs FastAPI, uvicorn and prometheus_client; install them with "
                        "`pip install -e '.[serve]'`.")


def run_server(state: State, sock: Any, drain_seconds: float) -> int:
    """Serve on `sock` (bound by `lmlab.serving.edge.bind` before anything loaded, with the edge's limits) until a
    signal; the exit status: 0 after a drain, 1 when a second signal cut it short, 2 when the model failed to load
    (`state.failure` says why)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            state.relay = Relay(asyncio.get_running_loop())
            await super().startup(sockets)
            state.start(state)  # the port is open: the model loads behind it

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler re-raises the signal once it has shut down (exit 143 for SIGTERM): not this one.
            if state.draining:
                state.log("lmlab serve: a second signal: stopping at once")
                self.force_exit = self.should_exit = True
                return
            state.draining, state.phase, self.should_exit = True, "draining", True
            running = state.served.batcher.load()[0] if state.served else 0
            state.log(f"lmlab serve: draining: no new requests; {running} running may finish for {drain_seconds:g}s")
            if state.served is not None:
                timer = threading.Timer(drain_seconds, state.served.batcher.abort)
                timer.daemon = True  # a drain that ends sooner exits without waiting for it
                timer.start()

    config = uvicorn.Config(create_app(state), log_level="warning", lifespan="off",
                            http=protocol(state.edge, state.log), timeout_keep_alive=state.edge.idle_timeout,
                            timeout_graceful_shutdown=drain_seconds + 5)
    server = Server(config)
    state.stop = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    if state.failure:
        return 2
    return 1 if server.force_exit else 0
