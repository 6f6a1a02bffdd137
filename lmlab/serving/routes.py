"""The routes of `lmlab serve`: `ROUTES`, the table the 404's text, the metrics' labels, the API key's exemptions
and the OpenAPI document are read from; and the groups that register them on the FastAPI app, each a function:
errors in OpenAI's shape; health, metrics and models; vLLM's tokenize and detokenize; completions and chats. It
imports FastAPI: `lmlab serve` asks for the `serve` extra (lmlab.core.extras) before it imports this."""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmlab.serving.batcher import QueueFull
from lmlab.serving.edge import read_body
from lmlab.serving.lanes import Busy, Lane, Left, client_of
from lmlab.serving.metrics import CONTENT_TYPE
from lmlab.serving.openai_api import ApiError, head, model_object, response
from lmlab.serving.requests import (
    check_model,
    detokenize_request,
    parse_request,
    read_request,
    read_tokenize,
    render_chat,
    tokenize_request,
)
from lmlab.serving.state import State
from lmlab.serving.streaming import Answer, ClientGone, server_sent_events


@dataclass(frozen=True)
class Route:
    """One route: its method and path as FastAPI registers it; `keyed`: it asks for the API key (the page, health
    checks and scrapers do not); `loading`: it answers 503 while the model loads or the server drains; `streamed`:
    it may answer as server-sent events; `statuses`: what else it may answer with, besides those of every route of
    its method."""

    method: str
    path: str
    keyed: bool = True
    loading: bool = True
    streamed: bool = False
    statuses: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """The route as people and the metrics name it: `{model_id}` as `{id}`."""
        return self.path.replace("{model_id}", "{id}")

ROUTES = (
    Route("GET", "/health", keyed=False),
    Route("GET", "/metrics", keyed=False, loading=False),
    Route("GET", "/v1/models"),
    Route("GET", "/v1/models/{model_id}", statuses=(404,)),
    Route("POST", "/v1/completions", streamed=True),
    Route("POST", "/v1/chat/completions", streamed=True),
    Route("POST", "/tokenize"),
    Route("POST", "/detokenize"),
)
OPEN = ("/", *(r.path for r in ROUTES if not r.keyed))  # answered without the API key: the page asks for it


def answered() -> str:
    """The routes as the 404 lists them: `GET /health, ..., POST /tokenize and POST /detokenize`."""
    names = [f"{r.method} {r.label}" for r in ROUTES]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def label(path: str) -> str:
    """The route a request's path is counted under in the metrics (unknown paths together, so they add no
    series)."""
    for route in ROUTES:  # a route with a parameter by what its path starts with
        if path == route.path or ("{" in route.path and path.startswith(route.path.split("{")[0])):
            return route.label
    return "other"


def add_error_handlers(app: Any) -> None:
    """Every error as OpenAI's error body: ours (ApiError), a route or method that does not exist, and a bug."""
    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(HTTPException)
    async def no_route(http: HttpRequest, err: HTTPException) -> Response:
        where, headers = f"{http.method} {http.url.path}", err.headers or {}
        if err.status_code == 405:
            return ApiError(405, f"{where} is not allowed; this route takes {headers.get('Allow')}.",
                            code="method_not_allowed", headers=headers).response()
        return ApiError(err.status_code, f"no route {where}; lmlab serve answers {answered()}.",
                        code="not_found", headers=headers).response()

    @app.exception_handler(Exception)
    async def server_error(_: HttpRequest, err: Exception) -> Response:
        # A bug of ours still answers in OpenAI's shape, and the server keeps running.
        return ApiError(500, f"internal error: {err!r}", kind="server_error").response()


def add_status_routes(app: Any, state: State) -> None:
    """/health (503 with the phase while loading or draining), /metrics, /v1/models and /v1/models/{id}."""
    @app.get("/health")
    async def health() -> JSONResponse:
        served = state.served
        if state.draining or served is None:
            status = "draining" if state.draining else "loading"
            return JSONResponse({"status": status, "phase": state.phase, "model": state.name}, status_code=503)
        decoding, waiting = served.batcher.load()
        return JSONResponse({"status": "ok", "model": state.name, "decode_step": state.decode_step,
                             "decode_step_why": state.decode_why, "compiled_step": state.compiled,
                             "threads": state.threads, "decoding": decoding, "max_batch": served.options.max_batch,
                             "waiting": waiting, "max_queue": served.batcher.max_queue,
                             "lanes": {lane.name: lane.load() for lane in (state.parse, state.render)}})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = state.loaded
        return {"object": "list", "data": [model_object(name, served.created, served.context) for name in state.names]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, state.names)
        return model_object(model_id, state.loaded.created, state.loaded.context)


def add_token_routes(app: Any, state: State) -> None:
    """vLLM's /tokenize and /detokenize, parsed in the lanes, off the event loop."""
    @app.post("/tokenize")
    async def tokenize(http: HttpRequest) -> Any:
        return Response(await parsed(http, state, read_tokenize, tokenize_request), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest) -> Any:
        return await parsed(http, state, read_request, detokenize_request, "detokenize")


async def parsed(http: Any, state: State, read: Any, finish: Any, *args: Any) -> Any:
    """A body through the lanes: `read` (JSON, field names, a chat's turns) and `finish` (values, tokens) in the
    parse lane, a chat's turns rendered between them in the render lane."""
    served = state.loaded
    raw = await read_body(http, served.options.max_body_bytes, state.edge.body_timeout)
    body = await in_lane(http, state.parse, len(raw), read, state.names, raw, *args)
    rendered = None if body.turns is None else await in_lane(http, state.render, len(raw), render_chat,
                                                              served, body.turns)
    return await in_lane(http, state.parse, len(raw), finish, served, body, rendered)


async def in_lane(http: Any, lane: Lane, cost: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)` run in `lane` for the request's client; a 429 with Retry-After when the lane is full and this
    client has as many waiting as any other (lmlab.serving.lanes), and the request's end, unrun, once its client
    has gone."""
    client = client_of(http.scope)
    try:
        return await lane.run(client, cost, fn, *args)
    except Busy as busy:
        what = "chats wait to be rendered" if lane.name == "render" else "requests wait to be read"
        raise ApiError(429, f"the server is busy: {busy.waiting} {what}, {busy.mine} of them from {client.name}; "
                       "retry shortly.", code="server_busy", kind="rate_limit_exceeded", headers={"Retry-After": "1"})
    except Left:
        http.scope.setdefault("lmlab", {})["left"] = True
        raise ApiError(499, "the client closed the connection before its request was read.", code="client_left")


def add_completion_routes(app: Any, state: State) -> None:
    """/v1/completions and /v1/chat/completions: a request parsed in the lanes, admitted to the batch (429
    when it and its queue are full), and answered whole or streamed as server-sent events."""
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
                release(state, self.answer)

    async def answer(http: HttpRequest, chat: bool) -> Any:
        request = await parsed(http, state, read_request, parse_request, "chat" if chat else "completions")
        pending = Answer(request, http.scope.setdefault("lmlab", {}),
                         lambda token: state.loaded.run.tokenizer.decode([token]), state.metrics.tokens)
        try:
            state.loaded.batcher.submit(pending.job)
        except QueueFull:
            raise ApiError(429, "the server is busy: the batch and its queue are full (--max-batch, "
                           "--max-queue); retry shortly.", code="server_busy", kind="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        state.metrics.prompt_tokens.inc(request.prompt_tokens)
        top = head(chat, state.name, uuid.uuid4().hex)
        if request.stream:
            return EventStream(pending, top)
        if not await whole(http, state, pending):
            return Response(status_code=499)  # no one reads it; the log says the client left
        return JSONResponse(response(top, chat, pending.texts_out(), pending.reasons, pending.usage(),
                                     pending.logprobs()))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await answer(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await answer(http, chat=True)


async def whole(http: Any, state: State, pending: Answer) -> bool:
    """Wait for a request answered whole; False when its client went away first. Its rows are given back either
    way."""
    watcher = asyncio.create_task(watch_disconnect(http, pending))
    try:
        while not pending.finished:
            await pending.next_events()
    except ClientGone:
        return False
    finally:
        watcher.cancel()
        release(state, pending)
    return True


def release(state: State, answer: Answer) -> None:
    """Give the rows back, whatever ended the request (a no-op once it finished)."""
    state.loaded.batcher.cancel(answer.job)
    if not answer.finished:
        answer.stats["left"] = True
        answer.stats["out"] = answer.generated


async def watch_disconnect(http: Any, answer: Answer) -> None:
    """Tell `answer` when its client goes away (the body is read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    answer.leave()
