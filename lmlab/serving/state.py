"""The server's `State` from its first moment: what the app, its routes and the start in the background share
(what it is asked to serve is lmlab.serving.edge.ServeOptions). No torch at the top: the port opens first."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmlab.serving.edge import ServeLimits
from lmlab.serving.lanes import PARSE_THREADS, RENDER_THREADS, Lane
from lmlab.serving.metrics import Metrics
from lmlab.serving.requests import Served
from lmlab.serving.streaming import Relay

# Reentrant: a stop signal's handler logs from the main thread, which may hold it already.
_saying = threading.RLock()


def say(line: str) -> None:
    """A line of the server's log on stderr, whole: the access log and the start in the background write from
    threads of their own, and print() writes a line and its end apart ("...200 0.001slmlab serve: ...")."""
    with _saying:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@dataclass
class State:
    """The server from its first moment: its names and key, the phase of its start (the run once served), the
    decode step in use, whether it drains, its metrics and the lanes its requests are parsed in (`parse`, `render`).
    `start` (given the state) begins loading once the port is open."""

    names: list[str]  # the model ids it answers to; the first is the one it answers with
    api_key: str | None
    start: Callable[[State], None]
    edge: ServeLimits = ServeLimits()  # what a connection may take (lmlab.serving.edge)
    log: Callable[[str], None] = say
    stop: Callable[[], None] = lambda: None  # ends the server (once it runs)
    phase: str = "starting"
    served: Served | None = None
    decode_step: str = "eager"  # lmlab.inference.steps' kind, or "eager, compiling"
    decode_why: str = ""  # why that step decodes
    compiled: dict[str, str] | None = None  # the compiled step decoding: its file and sha256 (checked as loaded)
    threads: int = 0  # the decode step's CPU threads, once loaded
    draining: bool = False
    failure: str | None = None  # why loading failed: the server stops, and the command says it
    relay: Relay | None = None
    metrics: Metrics = field(init=False)
    # Where requests' CPU work runs, bounded (lmlab.serving.lanes): bodies read, checked and tokenized; chat templates.
    parse: Lane = field(init=False, default_factory=lambda: Lane("parse", PARSE_THREADS))
    render: Lane = field(init=False, default_factory=lambda: Lane("render", RENDER_THREADS))

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.live)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def loaded(self) -> Served:
        """The served run, for the routes the gate lets through only once it is (lmlab.serving.app)."""
        assert self.served is not None, "a route that waits for the model ran while it loads"
        return self.served

    def live(self) -> dict[str, Any]:
        decoding, waiting = self.served.batcher.load() if self.served else (0, 0)
        info = {"model": self.name, "phase": self.phase, "decode_step": self.decode_step,
                "compiled_sha256": self.compiled["sha256"] if self.compiled else ""}
        if self.served:
            info |= {"run": str(self.served.run.run.path), "checkpoint": self.served.run.checkpoint,
                     "step": str(self.served.run.step), "max_model_len": str(self.served.context)}
        return {"decoding": decoding, "waiting": waiting,
                "max_batch": self.served.options.max_batch if self.served else 0,
                "ready": int(self.served is not None and not self.draining), "info": info}
