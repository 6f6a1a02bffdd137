"""The server's HTTP edge: what a connection may cost `lmlab serve` before any request reaches the model. The socket is
bound before the model loads (`bind`); connections are limited in all and per address, an idle one closed first to make
room (`admit`), so idle connections never keep out a client with a request; headers, bodies, idle keep-alives and
stalled readers have timeouts (`ServeLimits`). uvicorn's h11 protocol is extended here by the limits and timeouts it
does not have. `ServeOptions`, what the server is asked to serve, lives here too: the command line reads its defaults
without loading the server's other modules."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.core.busy import check_threads
from lmlab.core.errors import UserError
from lmlab.serving.lanes import GONE
from lmlab.serving.openai_api import ApiError


@dataclass(frozen=True)
class ServeLimits:
    """What one connection may take; each bounded by its option's type (lmlab.commands.serve.add_limits)."""

    max_connections: int = 256  # open at once; one more closes an idle one, or gets 503
    max_client_connections: int = 64  # open at once from one address (a proxy's clients share one: raise it)
    header_timeout: float = 10.0  # seconds for a request's headers to be whole
    body_timeout: float = 30.0  # seconds for its body to arrive
    idle_timeout: float = 5.0  # seconds a kept-alive connection may wait for a request, or a reader stall


@dataclass
class ServeOptions:
    """What `lmlab serve` is asked to serve, and how; a thread count or a run it cannot take is refused as made."""

    run: Path
    checkpoint: str = "best"
    device: str = "auto"
    max_tokens_cap: int = 512
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1_000_000
    compile: bool = False
    threads: int = 0  # CPU threads of the decode step; 0: chosen, one fewer than the cores at most (serving.startup)
    quantize: str = "none"  # the weights' format it decodes from (lmlab.inference.quantize)

    def __post_init__(self) -> None:
        # The counts are bounded by their argparse types (lmlab.commands.serve).
        check_threads("--threads", self.threads)
        if not (self.run / "config.toml").is_file():  # said before the port opens (RunDir.config's words)
            raise UserError(f"{self.run} is not an lmlab run (no config.toml); pass a directory made by "
                            "`lmlab train`, `lmlab finetune` or `lmlab import-hf`.")


LINGER = 2.0  # seconds a refused connection is read, its bytes dropped, before it is closed


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or one sentence saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host!r} is not an address or a name this machine can resolve ({err}); use "
                        "127.0.0.1 (this machine only) or 0.0.0.0 (every interface).")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT, not one in use
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use by another process; stop it or choose another --port.")
        if err.errno == errno.EACCES:
            raise UserError(f"binding port {port} needs privileges this user does not have (ports below 1024 do); "
                            "choose a --port from 1024.")
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --host or --port.")
    return sock


def _refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response with OpenAI's error body, for a connection refused before any request was read."""
    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "retry-after: 1\r\nconnection: close\r\n\r\n").encode() + body


def protocol(limits: ServeLimits, log: Any) -> type:
    """uvicorn's h11 protocol with the connection limits and the header and stall timeouts of `limits`; `log` writes
    one line per connection it refuses or closes."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("EdgeProtocol", (Edge, H11Protocol), {"limits": limits, "log": staticmethod(log)})


if TYPE_CHECKING:  # the mixin is checked against the protocol it extends; uvicorn is imported only to serve
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Host
else:
    _Host = object


class Edge(_Host):
    """What `protocol` adds to uvicorn's h11 protocol (a mixin: `super()` is uvicorn's)."""

    limits: ServeLimits
    log: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
        super().connection_made(transport)
        # deadline: for a request's headers, or a refusal's linger; stalled: for a reader to read on
        self.timers: dict[str, asyncio.TimerHandle] = {}
        # trusted: a request of it passed the key check; spoke: it sent something; refused: answered and closing
        self.opened, self.trusted, self.spoke, self.refused = self.loop.time(), False, False, False
        refusal = admit(self, self.connections, self.limits, self.log)
        if refusal is not None:
            self.log(f"- - 503 {client_name(self)}: {refusal}")
            self.refuse(503, f"this server has {refusal}; retry shortly.", "too_many_connections")
            return
        self._arm("deadline", self.limits.header_timeout, self._headers_late)

    def idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` and close, reading (and dropping) what the client still sends for up to LINGER seconds first:
        a socket closed with a request unread is reset by the kernel, and the client may lose the answer."""
        if self.transport.is_closing() or self.refused:
            return
        self.refused = True
        self.transport.write(_refusal(status, message, code))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._arm("deadline", LINGER, self.transport.close)

    def _arm(self, name: str, seconds: float, then: Callable[[], object]) -> None:
        """Call `then` in `seconds`, unless the timer `name` is armed again or cancelled first."""
        self._cancel(name)
        self.timers[name] = self.loop.call_later(seconds, then)

    def _cancel(self, name: str) -> None:
        if timer := self.timers.pop(name, None):
            timer.cancel()

    def _headers_late(self) -> None:
        """The deadline for a request's headers: the connection is closed unless they came."""
        if not self.idle():  # a pipelined request is being answered
            return
        seconds = self.limits.header_timeout
        self.log(f"- - 408 {client_name(self)}: no whole request headers within {seconds:g} s (--header-timeout)")
        self.refuse(408, f"the request headers did not arrive within {seconds:g} s (--header-timeout).",
                     "request_timeout")

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered already: what comes after is dropped
            return
        self.spoke, cycle = True, self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are whole: the body and the answer have their own clocks
            self._cancel("deadline")
            # a lane drops its jobs once true. uvicorn types the scope a closed TypedDict; ASGI lets a server add keys
            self.cycle.scope[GONE] = partial(getattr, self.cycle, "disconnected")  # type: ignore[literal-required]
        if self.cycle is not None and not self.cycle.more_body and self.flow.read_paused:
            # Reading on at a large body lets the client's going away be seen while its request waits.
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        self.trusted = self.trusted or cycle.scope.get("lmlab", {}).get("trusted", False)  # type: ignore[attr-defined]
        super().on_response_complete()  # arms uvicorn's keep-alive timer (idle_timeout), or starts a pipelined one
        if self.cycle is cycle and not self.transport.is_closing():  # bytes that trickle in later need whole
            headers_due = self.limits.idle_timeout + self.limits.header_timeout  # headers in time too
            self._arm("deadline", headers_due, self._headers_late)

    def pause_writing(self) -> None:  # the client stopped reading: its answer may wait idle_timeout at most
        super().pause_writing()
        self._arm("stalled", self.limits.idle_timeout, self._reader_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("stalled")

    def _reader_stalled(self) -> None:
        self.log(f"- - {client_name(self)}: the client read nothing for {self.limits.idle_timeout:g} s "
                 "(--idle-timeout); closed")
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers.values():
            timer.cancel()
        super().connection_lost(exc)


def client_name(connection: Any) -> str:
    return ":".join(map(str, connection.client)) if connection.client else "a client"


def admit(new: Any, connections: set[Any], limits: ServeLimits, log: Any) -> str | None:
    """Make room for `new` within the limits by closing idle connections (of its address first): those never trusted,
    then those that sent nothing, the oldest first; None when it fits, else which limit is full."""
    address = new.client[0] if new.client else None
    for option, most, where, counted in (
            ("--max-client-connections", limits.max_client_connections, f" from {address}",
             lambda c: c.client and c.client[0] == address),
            ("--max-connections", limits.max_connections, "", lambda c: True)):
        mine = [c for c in connections if counted(c) and not c.transport.is_closing() and not c.refused]
        while len(mine) > most:
            idle = [c for c in mine if c is not new and c.idle()]
            if not idle:
                return f"{most} connections{where} with requests under way ({option})"
            oldest = min(idle, key=lambda c: (c.trusted, c.spoke, c.opened))
            log(f"- - {client_name(oldest)}: idle, closed to make room for {client_name(new)} ({option} {most})")
            # Answered, not cut: a request the server has not read yet may be on its way, and a socket closed under
            # it is reset.
            oldest.refuse(503, f"this server closed this idle connection to make room for another ({option} "
                                f"{most}); retry.", "too_many_connections")
            mine.remove(oldest)
    return None


async def read_body(http: Any, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes (so a huge body never sits in memory),
    with 408 when it does not arrive within `timeout` seconds; a client that leaves while sending it ends the request
    with 499, which the access log marks `(client left)`."""
    from starlette.requests import ClientDisconnect

    too_large = ApiError(413, f"the request body is over {limit:,} bytes, this server's limit (--max-body-bytes); "
                         "send a shorter prompt.", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for piece in http.stream():
                body += piece
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout); send it at once.",
                       code="request_timeout", headers={"Connection": "close"})
    except ClientDisconnect:
        http.scope.setdefault("lmlab", {})["left"] = True
        raise ApiError(499, "the client closed the connection before its request was whole.", code="client_left")
    return bytes(body)
