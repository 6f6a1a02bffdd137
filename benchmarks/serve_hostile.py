"""What a hostile client costs everyone else on `lmlab serve` (issue 34's cases): for each load, a legitimate
three-token completion sent while it runs (its status and seconds), the server's resident memory before, at its
peak and after, and whether a SIGTERM then drains it (its exit status and seconds).

    python benchmarks/serve_hostile.py [--tree PATH ...] [--cases NAME ...]

The run is serve_throughput.py's "demo" shape (random weights, a char tokenizer) with a chat template that loops
for good. The loads: chats through that template; sixty 900 KB /tokenize bodies at once, sent again as answered;
a completion with four 240 KB stop strings; one client holding every connection slot with idle connections,
reopened as they close. Each case starts its own server. Each --tree is an lmlab source tree put first on PYTHONPATH
(`python -P`), so a version before a fix and one after compare in one sitting. Timings are only worth comparing
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table
from serve_throughput import CHARS, SHAPES, write_run  # benchmarks/serve_throughput.py, beside this script

from lmlab.commands.common import console

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"


def post(port: int, path: str, body: dict | bytes, timeout: float = 60) -> tuple[str, float]:
    """A POST's status (or what went wrong) and its seconds."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"})
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            status = str(answer.status)
    except urllib.error.HTTPError as err:
        status = str(err.code)
    except OSError as err:
        status = "timed out" if "timed out" in str(err) else type(err).__name__
    return status, time.perf_counter() - began


def memory(pid: int, key: str) -> float:
    """VmRSS or VmHWM of `pid`, in MB."""
    return int(open(f"/proc/{pid}/status").read().split(f"{key}:")[1].split()[0]) / 1024


def repeat(clients: int, port: int, path: str, body: dict | bytes, stop: threading.Event) -> None:
    """`clients` clients sending `body` again as each answer comes, until `stop`."""
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(lambda: [post(port, path, body, 60) for _ in iter(stop.is_set, True)])


def chats(port: int, stop: threading.Event) -> None:
    repeat(8, port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, stop)


def tokenize_flood(port: int, stop: threading.Event) -> None:
    repeat(60, port, "/tokenize", json.dumps({"prompt": (CHARS * 14_000)[:900_000]}).encode(), stop)


def huge_stops(port: int, stop: threading.Event) -> None:
    post(port, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 64, "stop": ["a" * 239_999 + "b"] * 4}, 60)


def idle_connections(port: int, stop: threading.Event) -> None:
    """One client (another address, 127.0.0.2) holding 256 connections that send nothing, reopening those the
    server closes every half second."""
    held: list[socket.socket] = []
    while not stop.is_set():
        while len(held) < 256:
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
            except OSError:
                break
        time.sleep(0.5)
        for sock in list(held):
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    raise ConnectionError
            except BlockingIOError:
                continue
            except OSError:
                pass
            held.remove(sock)
            sock.close()
    for sock in held:
        sock.close()


CASES: dict[str, Callable[[int, threading.Event], None] | None] = {
    "quiet": None, "8 chats through a looping template": chats, "60 x 900 KB /tokenize": tokenize_flood,
    "4 stop strings of 240 KB": huge_stops, "256 idle connections, reopened": idle_connections}


def measure(run: Path, tree: str, load: Callable[[int, threading.Event], None] | None) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"PYTHONPATH": str(Path(tree).resolve())} if tree else {})}
    server = subprocess.Popen([sys.executable, "-P", "-m", "lmlab", "serve", str(run), "--port", str(port),
                               "--device", "cpu", "--no-compile"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    while post(port, "/v1/completions", {"prompt": "x", "max_tokens": 1}, 10)[0] != "200":
        assert server.poll() is None, "the server exited; run it by hand to see why"
        time.sleep(0.3)
    before, stop = memory(server.pid, "VmRSS"), threading.Event()
    loader = threading.Thread(target=load, args=(port, stop), daemon=True) if load else None
    if loader:
        loader.start()
        time.sleep(3)  # the load under way
    status, seconds = post(port, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3}, 60)
    stop.set()
    if loader:
        loader.join(150)  # its requests answered (or timed out)
    time.sleep(1)
    peak, after = memory(server.pid, "VmHWM"), memory(server.pid, "VmRSS")
    began = time.perf_counter()
    server.terminate()
    try:
        drained = f"{server.wait(timeout=30)} in {time.perf_counter() - began:.1f}s"
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        drained = "stuck 30s, killed"
    return [f"{status} in {seconds:.2f}s", f"{before:.0f} / {peak:.0f} / {after:.0f}", drained]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    table = Table(title="A 3-token completion while a hostile client works (one server per row)")
    for column in ("tree", "load", "completion", "RSS MB before / peak / after the load", "SIGTERM: exit"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as folder:
        config, spec, _ = SHAPES["demo"]
        run = write_run(Path(folder) / "hostile", config, spec)
        (run / "chat_template.json").write_text(json.dumps({"template": LOOP, "tokens": {}, "end_of_turn": [],
                                                            "source": "benchmark"}))
        for case in args.cases:
            for tree in args.tree or [""]:
                with console.status(f"{tree or 'installed'}: {case}..."):
                    table.add_row(tree or "installed", case, *measure(run, tree, CASES[case]))
    console.print(table)


if __name__ == "__main__":
    main()
