"""`lmlab serve`'s HTTP edge against hostile clients (issue 29, items 4, 5, 8 and 15), on a real server process on
127.0.0.1 with tight limits: clients that leave mid-upload, idle and slow connections, more connections than
allowed, text that is not Unicode, JSON nested 200,000 deep, and a port already in use."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.conftest import LMLAB
from tests.test_serve import Server, post

pytest.importorskip("fastapi")

LIMITS = ("--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1", "--max-connections", "3")


@pytest.fixture(scope="module")
def edge(imported_gpt2):
    started = Server(imported_gpt2, "--max-batch", "2", *LIMITS)
    yield started
    started.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_after(sock: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closes `sock`, and what it sent before."""
    began, got = time.monotonic(), b""
    while True:
        try:
            piece = sock.recv(4096)
        except ConnectionResetError:
            piece = b""
        if not piece:
            return time.monotonic() - began, got
        got += piece


@pytest.mark.slow
def test_a_client_that_leaves_while_uploading_is_one_log_line(edge):
    for _ in range(3):
        with connect(edge) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.2)
    time.sleep(0.5)
    left = [line for line in edge.log if line.startswith("POST /v1/completions 499") and "(client left)" in line]
    assert len(left) == 3 and not any("Traceback" in line or "ClientDisconnect" in line for line in edge.log)
    assert edge.health()["status"] == "ok"


@pytest.mark.slow
@pytest.mark.serial
def test_idle_slow_and_stalled_connections_are_timed_out(edge):
    with connect(edge) as idle:  # sends nothing at all
        seconds, said = closed_after(idle)
    assert seconds < 3 and said.startswith(b"HTTP/1.1 408") and b"--header-timeout" in said
    with connect(edge) as slow:  # one byte of headers every 0.3 s: each resets no clock
        began = time.monotonic()
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n":
                slow.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:  # closed by the server, as it should be
            pass
        assert time.monotonic() - began < 4 and closed_after(slow)[0] < 1
    with connect(edge) as body:  # whole headers, a body that never comes
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        seconds, said = closed_after(body)
    assert seconds < 3 and said.startswith(b"HTTP/1.1 408") and b"--body-timeout" in said
    with connect(edge) as kept:  # a kept-alive connection after its answer
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, said = closed_after(kept)
    assert seconds < 3 and said.startswith(b"HTTP/1.1 200")
    assert edge.health()["status"] == "ok"


@pytest.mark.slow
@pytest.mark.serial
def test_connections_beyond_the_limit_are_refused_and_the_server_goes_on(edge):
    held = [connect(edge) for _ in range(3)]
    try:
        time.sleep(0.1)
        with connect(edge) as extra:
            seconds, said = closed_after(extra)
        assert seconds < 1 and said.startswith(b"HTTP/1.1 503") and b"too_many_connections" in said
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert edge.health()["status"] == "ok"
    assert any("more than 3 connections (--max-connections)" in line for line in edge.log)


@pytest.mark.slow
@pytest.mark.parametrize("path, raw, param", [
    ("completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("completions", b'{"prompt": "\\ud800", "stream": true}', "prompt"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("chat/completions", b'{"messages": [{"role": ["user"], "content": "x"}]}', "messages"),
    ("completions", b'{"\\ud800": 1}', "'\\ud800'"),
    ("completions", b"[" * 200_000 + b"]" * 200_000, None),
    ("completions", b'{"prompt": "x", "n": ' + b"[" * 900 + b"]" * 900 + b"}", "n"),
    ("completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
])
def test_text_that_is_not_unicode_and_json_nested_deep_get_400(edge, path, raw, param):
    status, body = post(f"{edge.url}/{path}", raw)
    assert status == 400 and body["error"]["param"] == param and body["error"]["message"], body
    assert not any("Traceback" in line for line in edge.log)


@pytest.mark.slow
def test_a_port_in_use_is_one_sentence_before_the_model_loads(edge, imported_gpt2):
    began = time.monotonic()
    done = subprocess.run([LMLAB, "serve", imported_gpt2, "--port", str(edge.port)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: port {edge.port} on 127.0.0.1 is in use by another process; stop it or choose another --port."]
    assert "serving" not in done.stdout and time.monotonic() - began < 10
    assert edge.health()["status"] == "ok"
