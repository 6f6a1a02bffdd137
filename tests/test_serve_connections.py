"""`lmlab serve`'s HTTP edge against hostile clients, on a real server process on 127.0.0.1 with tight limits: clients
that leave mid-upload, idle and slow connections, more connections than allowed (idle ones that keep coming back,
busy ones from one address and from many), text that is not Unicode, JSON nested 200,000 deep, and a port already in
use. Clients at other addresses of the loopback network (127.0.0.2, ...) stand for other machines."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import LMLAB, Server, post

pytest.importorskip("fastapi")

LIMITS = ("--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1", "--max-connections", "3")


@pytest.fixture(scope="module")
def edge(imported_gpt2):
    started = Server(imported_gpt2, "--max-batch", "2", *LIMITS)
    yield started
    started.stop()


def connect(server: Server) -> socket.socket:
    """A connection whose reads give up after 10 s: a server that never closes it fails the test, not hangs it."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_after(sock: socket.socket) -> bytes:
    """What the server sent on `sock` before it closed it."""
    got = b""
    while True:
        try:
            piece = sock.recv(4096)
        except ConnectionResetError:
            piece = b""
        if not piece:
            return got
        got += piece


@pytest.mark.slow
def test_a_client_that_leaves_while_uploading_is_one_log_line(edge):
    for _ in range(3):
        with connect(edge) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.2)  # the client's own pace: it leaves a moment into its upload
    left = edge.logged(lambda line: line.startswith("POST /v1/completions 499") and "(client left)" in line, 3)
    assert len(left) == 3 and not any("Traceback" in line or "ClientDisconnect" in line for line in edge.log)
    assert edge.health()["status"] == "ok"


@pytest.mark.slow
def test_idle_slow_and_stalled_connections_are_timed_out(edge):
    """Each connection is closed by the server with the timeout that applies (the 408 says which), not by the
    client; a server that never closes one fails the read's 10 s timeout (`connect`)."""
    with connect(edge) as idle:  # sends nothing at all
        said = closed_after(idle)
    assert said.startswith(b"HTTP/1.1 408") and b"--header-timeout" in said
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(edge) as slow:  # one byte of headers every 0.3 s (10 s in all, against a 1 s timeout)
        sent = 0
        try:
            for byte in request:
                slow.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.3)  # the client's own pace
        except OSError:  # closed by the server, as it should be
            pass
        said = closed_after(slow)
    assert sent < len(request) and not said.startswith(b"HTTP/1.1 200"), (sent, said)  # no byte reset the clock
    with connect(edge) as body:  # whole headers, a body that never comes
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        said = closed_after(body)
    assert said.startswith(b"HTTP/1.1 408") and b"--body-timeout" in said
    with connect(edge) as kept:  # a kept-alive connection after its answer
        kept.sendall(request)
        said = closed_after(kept)
    assert said.startswith(b"HTTP/1.1 200")
    assert edge.health()["status"] == "ok"


@pytest.fixture(scope="module")
def crowded(imported_gpt2):
    """Four connections at once, two from one address; body and header timeouts long enough to hold them."""
    started = Server(imported_gpt2, "--max-batch", "2", "--max-connections", "4", "--max-client-connections", "2")
    yield started
    started.stop()


def busy(server: Server, address: str) -> socket.socket:
    """A connection from `address` with a request under way: its headers whole and its body asked for (the
    server's 100 Continue says it is reading it), never sent."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 100"), address
    return sock


def refused(server: Server, address: str) -> bytes:
    """What the server says to one more connection from `address` before it closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(address, 0)) as extra:
        return closed_after(extra)


def completion(server: Server) -> int:
    """The status of a two-token completion from 127.0.0.1."""
    return post(f"{server.url}/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode())[0]


@pytest.mark.slow
def test_connections_with_requests_under_way_fill_the_limit_and_one_more_gets_503(crowded):
    held = [busy(crowded, f"127.0.0.{i}") for i in range(2, 6)]
    try:
        said = refused(crowded, "127.0.0.6")
        assert said.startswith(b"HTTP/1.1 503") and b"too_many_connections" in said and \
            b"4 connections with requests under way (--max-connections)" in said, said
    finally:
        for sock in held:
            sock.close()
    assert completion(crowded) == 200
    assert any("4 connections with requests under way (--max-connections)" in line for line in crowded.log)


@pytest.mark.slow
def test_one_address_gets_its_share_of_connections_and_the_others_are_served(crowded):
    held = [busy(crowded, "127.0.0.2") for _ in range(2)]
    try:
        said = refused(crowded, "127.0.0.2")
        assert said.startswith(b"HTTP/1.1 503") and \
            b"2 connections from 127.0.0.2 with requests under way (--max-client-connections)" in said, said
        assert completion(crowded) == 200  # another address still gets in
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow
def test_a_refused_connection_that_sent_its_request_reads_the_503_not_a_reset(crowded):
    """A refused connection's request is read before the 503 is written and the socket closed (a socket closed with
    a request unread is answered by the kernel with a reset): every refused client reads the 503."""
    held = [busy(crowded, "127.0.0.2") for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", crowded.port), timeout=10, source_address=("127.0.0.2", 0)) as sock:
            body = b"x" * (4 << 20)  # more than the socket buffers hold: sent only while the server reads it
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            said = closed_after(sock)
        assert said.startswith(b"HTTP/1.1 503") and b"too_many_connections" in said, said
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow
def test_idle_connections_that_keep_coming_back_never_keep_out_a_request(crowded):
    # The attack: every slot held by connections that send nothing, each reopened as soon as it closes.
    stop, opened = threading.Event(), [0]

    def hog() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            for address in (f"127.0.0.{i}" for i in range(2, 10)):
                socks.append(socket.create_connection(("127.0.0.1", crowded.port), source_address=(address, 0)))
                opened[0] += 1
            time.sleep(0.05)
            for sock in [sock for sock in socks if closed(sock)]:
                socks.remove(sock)
                sock.close()
        for sock in socks:
            sock.close()

    def completion_retried() -> int:
        """A client's completion, sent again as a 503's Retry-After says: a connection the server had not heard
        yet (its request on its way) may be closed, idle, to make room, with that 503, never cut."""
        for _ in range(20):
            request = urllib.request.Request(f"{crowded.url}/completions", headers={"Content-Type":
                                             "application/json"}, data=json.dumps({"prompt": "x", "max_tokens": 2})
                                             .encode())
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                if err.code != 503 or err.headers.get("Retry-After") is None:
                    return err.code
                retried[0] += 1
                time.sleep(float(err.headers["Retry-After"]))
        return 503

    attacker, retried = threading.Thread(target=hog), [0]
    attacker.start()
    try:
        while opened[0] < 40:  # the slots are full of idle connections, and some have been made way for
            time.sleep(0.05)
        assert [completion_retried() for _ in range(10)] == [200] * 10, retried
    finally:
        stop.set()
        attacker.join(30)
    assert any("idle, closed to make room for 127.0.0.1:" in line for line in crowded.log)
    assert crowded.health()["status"] == "ok"


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock`: a connection that sent nothing hears nothing else than the 503 it is
    closed with, to make room."""
    sock.setblocking(False)
    try:
        sock.recv(1)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("path, raw, param", [
    ("v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("v1/completions", b'{"prompt": "\\ud800", "stream": true}', "prompt"),
    ("v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("v1/chat/completions", b'{"messages": [{"role": ["user"], "content": "x"}]}', "messages"),
    ("v1/completions", b'{"\\ud800": 1}', "'\\ud800'"),
    ("tokenize", b'{"prompt": "x", "\\ud800": 1}', "'\\ud800'"),
    ("v1/completions", b"[" * 200_000 + b"]" * 200_000, None),
    ("v1/completions", b'{"prompt": "x", "n": ' + b"[" * 900 + b"]" * 900 + b"}", "n"),
    ("v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
])
def test_text_that_is_not_unicode_and_json_nested_deep_get_400(edge, path, raw, param):
    status, body = post(f"{edge.root}/{path}", raw)
    assert status == 400 and body["error"]["param"] == param and body["error"]["message"], body
    assert not any("Traceback" in line for line in edge.log)


@pytest.mark.slow
def test_a_port_in_use_is_one_sentence_before_the_model_loads(edge, imported_gpt2):
    done = subprocess.run([LMLAB, "serve", imported_gpt2, "--port", str(edge.port)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: port {edge.port} on 127.0.0.1 is in use by another process; stop it or choose another --port."]
    assert "lmlab serve:" not in done.stdout  # refused before the line said once the port is bound
    assert edge.health()["status"] == "ok"
