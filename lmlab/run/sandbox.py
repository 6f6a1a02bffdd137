"""Chat templates rendered in worker processes of their own (`python -m lmlab.run.sandbox`: jinja2, no torch),
bounded in time (RENDER_SECONDS, then a CPU-time limit, then the caller's kill after GRACE), memory (RENDER_MEMORY of
address space) and output. A template is code from the Hub: Jinja's sandbox keeps it from Python's internals but not
from looping, recursing or printing without end, which in a server would hold a thread for good. A render past a
bound is a `RenderError`; workers are reused, one per render under way, ended with their caller's process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmlab.core.workers import python_command

RENDER_SECONDS = 2.0  # a real template renders a long conversation in milliseconds
GRACE = 3.0  # for a worker to answer once its timer has fired (a long C call finishes first)
RENDER_MEMORY = 256 << 20  # bytes of address space a worker may have (a 4M-character render peaks near 100 MB)
RENDER_CHARS = 4_000_000  # the longest prompt a render may give (more than any model's context holds)


class RenderError(Exception):
    """Why a render failed: `kind` is one of syntax (with `line`), undefined, refused (the template's own error),
    time, memory, recursion, size, crashed, start (the worker did not start: `detail` says why); `detail` the
    template's words where it has some."""

    def __init__(self, kind: str, detail: str = "", line: int | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.line = kind, detail, line


def render(template: str, variables: dict[str, Any]) -> str:
    """`template` rendered with `variables` (JSON values) by a worker, at most RENDER_CHARS characters long; a
    RenderError otherwise."""
    request = _line_of({"template": template, "variables": variables})
    try:
        worker = _idle.pop()
    except IndexError:  # none idle
        worker = _Worker()
    try:
        return worker.ask(request)
    finally:
        if worker.alive():
            _idle.append(worker)


# Workers no render is using. A list's pop and append are each atomic, so threads share it without a lock.
_idle: list[_Worker] = []


def _line_of(value: Any) -> bytes:
    """A JSON line as the two sides send it: UTF-8, a lone surrogate (what a JSON "\\ud800" decodes to) kept."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self) -> None:
        self.errors = tempfile.TemporaryFile()  # what a worker that fails to start says (a file never fills up)
        self.proc = subprocess.Popen(python_command("lmlab.run.sandbox"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errors)
        self.buffer = b""
        line = self._line(time.monotonic() + 120)  # a busy machine may take seconds to start Python
        if line != b"ready":
            self._end()
            raise RenderError("start", self._start_failure(line))

    def _start_failure(self, line: bytes | None) -> str:
        """Why the worker did not start: its own report (an import that failed), else its last line on stderr."""
        try:
            return json.loads(line)["detail"]  # type: ignore[arg-type]  # None: the TypeError below
        except (TypeError, ValueError, KeyError):
            self.errors.seek(0)
            said = self.errors.read().decode("utf-8", "replace").strip().splitlines()
            return said[-1] if said else f"it exited with status {self.proc.returncode}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: bytes) -> str:
        assert self.proc.stdin is not None, "started with stdin=PIPE"
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            line = self._line(time.monotonic() + RENDER_SECONDS + GRACE)
        except OSError:  # it died (killed from outside)
            line = None
        if line is None:
            died = self.proc.poll()
            self._end()
            raise RenderError("time" if died in (None, -signal.SIGXCPU, -signal.SIGKILL) else "crashed")
        reply = json.loads(line.decode("utf-8", "surrogatepass"))
        if "text" in reply:
            return reply["text"]
        if reply["error"] in ("memory", "recursion"):  # recovered from, but a fresh worker is surer
            self._end()
        raise RenderError(reply["error"], reply.get("detail", ""), reply.get("line"))

    def _line(self, deadline: float) -> bytes | None:
        """The worker's next line, or None when it has not written one by `deadline` or died."""
        assert self.proc.stdout is not None, "started with stdout=PIPE"
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            piece = os.read(fd, 1 << 20)
            if not piece:
                return None
            self.buffer += piece
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def _end(self) -> None:
        """Kill the worker; its stderr file stays readable (`_start_failure` reads it after) until the worker is
        dropped."""
        self.proc.kill()
        self.proc.wait()


# -- the worker's side ------------------------------------------------------------------------------------------


class _Expired(BaseException):
    """Raised inside a render by the interval timer; a BaseException, so no `except Exception` in Jinja stops it."""


@lru_cache(maxsize=1)
def _environment() -> Any:
    """Jinja's immutable sandbox as transformers sets it up: trim_blocks, lstrip_blocks, loop controls,
    `{% generation %}`, a `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`; and one thing
    stricter: a variable nobody passed fails where it is used (lmlab.run.chat says which)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    from jinja2.utils import missing

    class Unset(jinja2.Undefined):
        """A variable nobody passed is Jinja's StrictUndefined, which fails where it is used (printed,
        tested, looped over, compared); a missing key or attribute of a value the template was given is a
        plain Undefined, empty as in transformers. `is defined` works for both."""

        def __new__(cls, hint: str | None = None, obj: Any = missing, name: str | None = None,
                    exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError) -> Any:
            kind = jinja2.StrictUndefined if obj is missing else jinja2.Undefined
            return kind(hint, obj, name, exc)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; rendering a
        prompt only needs its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def refuse(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=Unset,
                                                       extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=refuse, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    return _environment().from_string(template)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _render(request: dict[str, Any]) -> dict[str, Any]:
    """One request answered: {"text"} or {"error", "detail", "line"}."""
    import jinja2

    try:
        template = _compiled(request["template"])
        pieces, size = [], 0
        for piece in template.generate(**request["variables"]):
            size += len(piece)
            if size > RENDER_CHARS:
                return {"error": "size"}
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except _Expired:
        return {"error": "time"}
    except jinja2.TemplateSyntaxError as err:
        return {"error": "syntax", "detail": err.message or "", "line": err.lineno}
    except jinja2.UndefinedError as err:
        return {"error": "undefined", "detail": _first_line(err)}
    except RecursionError:
        return {"error": "recursion"}
    except MemoryError:
        return {"error": "memory"}
    except Exception as err:  # the template's own refusal (raise_exception), or what it did wrong
        return {"error": "refused", "detail": _first_line(err)}


def _bounded(request: dict[str, Any]) -> dict[str, Any]:
    """`_render` under the timer and, past it, the CPU-time limit (raised from this process's CPU time so far)."""
    import resource

    budget = int(time.process_time() + RENDER_SECONDS + GRACE) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (budget if hard == resource.RLIM_INFINITY else min(budget, hard), hard))
    _timer["on"] = True
    signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        return _render(request)
    except _Expired:  # fired between the render's end and here
        return {"error": "time"}
    finally:
        _timer["on"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


_timer = {"on": False}


def _expire(signum: int, frame: Any) -> None:
    if _timer["on"]:
        _timer["on"] = False
        raise _Expired


def main() -> None:
    """The worker: a request per line on stdin (JSON), a reply per line on stdout, until stdin closes."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    signal.signal(signal.SIGALRM, _expire)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the command; it ends this worker's input
    out = sys.stdout.buffer
    try:
        _environment()  # Jinja imported before the worker says it is ready: a failed import is said as itself
    except Exception as err:
        out.write(_line_of({"error": "start", "detail": f"{type(err).__name__}: {_first_line(err)}"}))
        out.flush()
        return
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            reply = _line_of(_bounded(json.loads(line.decode("utf-8", "surrogatepass"))))
        except MemoryError:
            reply = _line_of({"error": "memory"})
        out.write(reply)
        out.flush()


if __name__ == "__main__":
    main()
