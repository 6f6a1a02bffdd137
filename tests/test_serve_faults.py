"""What a careless or hostile client does to `lmlab serve`, against a real server process on 127.0.0.1: clients that
drop mid-stream give their rows back at once, a huge body is refused unread while others are served, a flood of large
/tokenize bodies neither starves a completion nor keeps the memory it took, stop strings are bounded, and values no
type check catches get 400, not 500."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import Server, post

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def one_row(sft_run):
    """A server that decodes one request at a time and lets none wait: the tightest place to leak a row."""
    started = Server(sft_run, "--max-batch", "1", "--max-queue", "0")
    yield started
    started.stop()


def dropped_stream(port: int, max_tokens: int = 512) -> None:
    """A streamed completion whose client reads the first chunk and goes away (curl --max-time)."""
    body = json.dumps({"prompt": "To be", "max_tokens": max_tokens, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def wait_idle(server: Server) -> dict:
    """/health once nothing decodes or waits (the server has had a moment to see the clients go)."""
    for _ in range(300):
        health = server.health()
        if (health["decoding"], health["waiting"]) == (0, 0):
            return health
        time.sleep(0.05)
    raise AssertionError(f"rows still held after the clients left: {health}")


@pytest.mark.slow
def test_clients_that_drop_mid_stream_give_their_rows_back(one_row):
    for _ in range(5):  # one leaked row would lock this one-row server out
        dropped_stream(one_row.port)
        wait_idle(one_row)  # the row comes back once the server has seen the client go
    deadline = time.monotonic() + 30
    while len(streams := [line for line in one_row.log if line.startswith("POST /v1/completions")]) < 5:
        assert time.monotonic() < deadline, streams
        time.sleep(0.05)
    # Each is one line: (client left) before its end, or whole when the reply reached its end-of-text token before
    # the server saw the client go (this model's replies are a few tokens long: a race no client controls).
    assert len(streams) == 5 and all(int(line.split(" out=")[1].split()[0]) < 512 for line in streams), streams
    status, body = post(f"{one_row.url}/completions", json.dumps({"prompt": "x", "max_tokens": 3}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


@pytest.mark.slow
def test_the_batch_full_gets_429_with_retry_after_and_the_others_are_served(one_row):
    body = json.dumps({"prompt": "To be", "max_tokens": 256, "temperature": 0}).encode()

    def ask(_: int) -> tuple[int, str | None]:
        request = urllib.request.Request(f"{one_row.url}/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, None
        except urllib.error.HTTPError as err:
            assert json.loads(err.read())["error"]["code"] == "server_busy"
            return err.code, err.headers.get("Retry-After")

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(12)))
    assert {status for status, _ in answers} <= {200, 429} and (200, None) in answers
    assert (429, "1") in answers  # one row and no queue: twelve at once cannot all be taken
    wait_idle(one_row)


@pytest.mark.slow
def test_a_huge_body_is_refused_unread_while_others_are_served(one_row):
    before = high_water_mb(one_row)
    with socket.create_connection(("127.0.0.1", one_row.port), timeout=30) as sock:
        # 20 MB announced, none of it sent: the answer comes from the header alone
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n")
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413")
        assert b"request_too_large" in head + sock.recv(4096)
    with socket.create_connection(("127.0.0.1", one_row.port), timeout=30) as sock:
        # 20 MB chunked (no length to check): refused once the first MB is in, the rest never read
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (1 << 16, b"a" * (1 << 16))
        sock.settimeout(0.05)
        answer = b""
        for _ in range(320):
            try:
                sock.sendall(piece)
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # the server closed the connection after answering
                break
            if answer:
                break
        sock.settimeout(30)
        answer += recv_some(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A prompt under the body limit but over what the context can hold: 400 from its length, untokenized.
    status, body = post(f"{one_row.url}/completions", json.dumps({"prompt": "night " * 150_000}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert json.loads(urllib.request.urlopen(f"{one_row.url}/models", timeout=10).read())["data"]
    assert high_water_mb(one_row) - before < 100  # none of the bodies was held whole, nor tokenized


def recv_some(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""


def high_water_mb(server: Server) -> float:
    """The server process's peak resident memory so far (VmHWM), in MB."""
    status = open(f"/proc/{server.proc.pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "x", "seed": 99999999999999999999999}', "seed"),
    (b'{"prompt": "x", "seed": -1}', "seed"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    (b'{"prompt": "x", "n": true}', "n"),
])
def test_values_no_type_check_catches_get_400_naming_the_field(one_row, raw, param):
    status, body = post(f"{one_row.url}/completions", raw)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.slow
def test_a_flood_of_large_tokenize_bodies_starves_no_completion_and_gives_its_memory_back(one_row):
    post(f"{one_row.root}/tokenize", json.dumps({"prompt": "warm up " * 1000}).encode())
    before, peak = resident_mb(one_row), high_water_mb(one_row)
    body = json.dumps({"prompt": ("ROMEO: sweet night, thou art fair " * 9000)[:300_000],
                       "return_token_strs": True}).encode()
    flood = 12

    def answered() -> int:
        return sum(line.startswith("POST /tokenize 200") for line in one_row.log)

    done = answered()
    with ThreadPoolExecutor(flood) as pool:
        statuses = [pool.submit(post, f"{one_row.root}/tokenize", body) for _ in range(flood)]
        while answered() == done:  # the flood is being read
            time.sleep(0.05)
        status, answer = post(f"{one_row.url}/completions", json.dumps({"prompt": "Hi", "max_tokens": 3}).encode())
        assert status == 200 and answer["usage"]["completion_tokens"] <= 3
        assert answered() - done < flood  # answered while the flood still waits: not behind it
        assert {future.result()[0] for future in statuses} <= {200, 429}
    # One large body read at a time, its garbage given back: twelve never held in memory at once.
    assert high_water_mb(one_row) - peak < 250 and resident_mb(one_row) - before < 100


def resident_mb(server: Server) -> float:
    status = open(f"/proc/{server.proc.pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.slow
def test_stop_strings_are_bounded_and_long_ones_slow_no_one(one_row):
    status, body = post(f"{one_row.url}/completions", json.dumps(
        {"prompt": "Hi", "max_tokens": 4, "stop": ["a" * 240_000] * 4}).encode())
    assert status == 400 and body["error"]["param"] == "stop" and "at most 1,000 characters" in body["error"]["message"]
    # At the bound, strings that match partly at every character: each character is still read once.
    status, body = post(f"{one_row.url}/completions", json.dumps(
        {"prompt": "Hi", "max_tokens": 20, "temperature": 0, "stop": ["e" * 999 + "x", " " * 999 + "x"]}).encode())
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
