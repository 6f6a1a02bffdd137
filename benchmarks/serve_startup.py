"""How long `lmlab serve` takes from the command to its first answers: the port open, /health 200, a completion.

    python benchmarks/serve_startup.py [--shape demo] [--repeats 2] [--tree PATH ...]

A run folder of the shape (random weights, as benchmarks/serve_throughput.py writes it) is served by
`python -m lmlab serve RUN --device cpu` with and without --compile. From the moment the process starts, one
thread polls GET /health and another POSTs a one-token completion, each every 20 ms until it gets a 200: the
table gives the seconds to the first HTTP answer of any status (the port open), to the first 200 on /health
(the model ready), to the first completion, and (compiled) until /health no longer says the step is compiling
(an lmlab that serves eagerly while it compiles says "eager, compiling" until then; one that does not is
compiled at its first 200). Compiled starts run twice in a row over one cache folder
($XDG_CACHE_HOME, new for each repeat): "cold" is the first, with nothing kept, "kept" the second, which finds
what the first left there (nothing, for an lmlab that keeps no compiled step). Each --tree is an lmlab source
tree put first on PYTHONPATH (`python -P`), so two versions compare in one sitting, taking turns in each round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.table import Table
from serve_throughput import SHAPES, write_run  # benchmarks/serve_throughput.py, beside this script

from lmlab.commands.common import console

POLL = 0.02
COLUMNS = ("port open", "/health 200", "first completion", "compiled step in use")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int | None, bytes]:
    """The HTTP status and body of one request; None when nothing answers (the port closed)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request(method, path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        status, text = answer.status, answer.read()
        connection.close()
        return status, text
    except OSError:
        return None, b""


def start_times(command: list[str], env: dict[str, str], port: int, compiled: bool) -> dict[str, float]:
    """Seconds from starting `command` to the port answering, /health 200, a first completion and (`compiled`)
    the compiled step in use."""
    seen: dict[str, float] = {}
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 1}).encode()
    log = tempfile.TemporaryFile("w+")  # the server's log (a line per poll): a pipe nobody reads would fill up
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)

    def poll(name: str, method: str, path: str, payload: bytes | None) -> None:
        while proc.poll() is None:
            status, text = status_of(port, method, path, payload)
            now = time.perf_counter() - started
            if status is not None:
                seen.setdefault("port open", now)
            if status == 200:
                seen.setdefault(name, now)
                # An lmlab that compiles behind eager decoding says so on /health until it is done.
                if not (compiled and path == "/health" and b'"eager, compiling"' in text):
                    if compiled and path == "/health":
                        seen["compiled step in use"] = now
                    return
            time.sleep(POLL)

    pollers = [threading.Thread(target=poll, args=("/health 200", "GET", "/health", None)),
               threading.Thread(target=poll, args=("first completion", "POST", "/v1/completions", body))]
    for thread in pollers:
        thread.start()
    for thread in pollers:
        thread.join()
    if proc.poll() is not None:
        log.seek(0)
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    proc.terminate()
    proc.wait(timeout=60)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    args = parser.parse_args()
    trees = args.tree or [""]
    modes = ("eager", "compiled, cold", "compiled, kept")
    times: dict[tuple[str, str], list[dict[str, float]]] = {(t, m): [] for t in trees for m in modes}
    with tempfile.TemporaryDirectory() as folder:
        config, spec, _ = SHAPES[args.shape]
        run = write_run(Path(folder) / args.shape, config, spec)
        for round_ in range(args.repeats):
            for i, tree in enumerate(trees):
                env = {**os.environ, "XDG_CACHE_HOME": str(Path(folder) / f"cache-{round_}-{i}")}
                if tree:
                    env["PYTHONPATH"] = str(Path(tree).resolve())
                for mode in modes:
                    port = free_port()
                    command = [sys.executable, "-P", "-m", "lmlab", "serve", str(run), "--port", str(port),
                               "--device", "cpu", "--no-compile" if mode == "eager" else "--compile"]
                    with console.status(f"round {round_ + 1}/{args.repeats}: {tree or 'installed'}, {mode}..."):
                        times[(tree, mode)].append(start_times(command, env, port, mode != "eager"))
    table = Table(title=f"`lmlab serve` ({args.shape} shape) on the CPU: seconds from the command, median (best) "
                        f"of {args.repeats}")
    table.add_column("lmlab")
    table.add_column("decode step")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for (tree, mode), rows in times.items():
        cells = [f"{statistics.median(r[c] for r in rows):.2f} ({min(r[c] for r in rows):.2f})" if c in rows[0]
                 else "-" for c in COLUMNS]
        table.add_row(tree or "installed", mode, *cells)
    console.print(table)


if __name__ == "__main__":
    main()
