"""An OpenAI-compatible HTTP server for a run's model (the routes are lmlab.serving.routes'): every request is decoded
in one shared batch (lmlab.serving.batcher). The port is bound and answering before torch is imported: until the model
is ready, /health answers 503 with the phase of the start and the API 503 `model_loading`. A first SIGTERM or SIGINT
drains (running requests go on for up to --drain-seconds, then end with finish reason "abort"); a second ends the
process at once. docs/reference/serving.md says the limits and what each refusal answers."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import threading
import time
from typing import Any

from lmlab.core.errors import UserError
from lmlab.serving.edge import protocol
from lmlab.serving.openai_api import ApiError
from lmlab.serving.page import add_page_route
from lmlab.serving.routes import (
    OPEN,
    add_completion_routes,
    add_error_handlers,
    add_status_routes,
    add_token_routes,
    label,
)
from lmlab.serving.schema import add_openapi
from lmlab.serving.state import State
from lmlab.serving.streaming import Relay


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
    """The 401 for a request without `Bearer api_key`, or None. The key is compared as the UTF-8 bytes a client sends
    (an environment's bytes that are not UTF-8 as they were: surrogateescape); the 401 closes the connection, so a
    client without the key holds none open."""
    given = headers.get(b"authorization", b"")
    key = api_key.encode("utf-8", "surrogateescape")
    scheme, _, token = given.partition(b" ")
    if not given:
        message = "no API key given; send it as `Authorization: Bearer KEY` (the openai client's api_key)."
    elif scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), key):
        message = ("the API key given is not this server's (--api-key); check the key sent as "
                   "`Authorization: Bearer KEY`.")
    else:
        return None
    return ApiError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer", "Connection": "close"})


def create_app(state: State) -> Any:
    """The ASGI application of `state`: FastAPI's routes behind the gate (key, loading, draining) and the log."""
    from fastapi import FastAPI

    app = FastAPI(title=f"lmlab: {state.name}")
    add_error_handlers(app)
    add_status_routes(app, state)
    add_token_routes(app, state)
    add_completion_routes(app, state)
    add_page_route(app)
    add_openapi(app, state)
    return AccessLog(Gate(app, state), state)


class Gate:
    """ASGI middleware in front of the routes: the API key (every route but /health and /metrics), then 503 for the API
    while the model loads or once the server drains, before a body is read."""

    def __init__(self, app: Any, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN:
            return await self.app(scope, receive, send)
        state = self.state
        error = unauthorized(dict(scope["headers"]), state.api_key) if state.api_key else None
        if error is None:
            scope.setdefault("lmlab", {})["trusted"] = True  # the edge closes connections never trusted first
        if error is None and state.served is None:
            error = ApiError(503, f"the model is loading ({state.phase}); retry shortly.", code="model_loading",
                             kind="server_error", headers={"Retry-After": "1"})
        if error is None and state.draining:
            error = ApiError(503, "the server is shutting down and takes no new requests; send it to another.",
                             code="shutting_down", kind="server_error", headers={"Connection": "close"})
        await (self.app if error is None else error.response())(scope, receive, send)


class AccessLog:
    """ASGI middleware writing one line per request and counting it in the metrics."""

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
            self.state.metrics.requests.labels(label(scope["path"]), str(status[0])).inc()
            parts = [scope["method"], printable(scope["path"]), str(status[0])]
            if "out" in stats:
                self.state.metrics.duration.observe(seconds)
                first = stats.get("first")
                ttft = f"{first - started:.3f}s" if first else "-"
                parts += [f"in={stats['in']}", f"out={stats['out']}", f"ttft={ttft}",
                          f"{stats['out'] / seconds:.1f} tok/s"]
            parts.append(f"{seconds:.3f}s" + (" (client left)" if stats.get("left") else ""))
            self.state.log(" ".join(parts))


def printable(path: str) -> str:
    """A request's path as the log writes it: what is not printable ASCII percent-encoded (a `%0A` would begin a forged
    line)."""
    return "".join(c if " " < c < "\x7f" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                   for c in path)


def run_server(state: State, sock: Any, drain_seconds: float) -> int:
    """Serve on `sock` (bound by `lmlab.serving.edge.bind`) until a signal; the exit status: 0 after a drain, 1 when a
    second signal cut it short, 2 when the model failed to load."""
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

    # uvicorn annotates its timeouts as int but takes seconds as any number (asyncio's call_later and wait_for)
    keep_alive, drain = state.edge.idle_timeout, drain_seconds + 5
    config = uvicorn.Config(create_app(state), log_level="warning", lifespan="off",
                            http=protocol(state.edge, state.log),
                            timeout_keep_alive=keep_alive, timeout_graceful_shutdown=drain)  # type: ignore[arg-type]
    server = Server(config)
    state.stop = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    return 2 if state.failure else 1 if server.force_exit else 0
