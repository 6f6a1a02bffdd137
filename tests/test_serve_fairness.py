"""One client's load kept to that client, on a real `lmlab serve` on 127.0.0.1: a client flooding the lane that reads
bodies is the one refused when it is full, others' requests go around its queue, and the jobs of a client that went
away are dropped unrun. Clients at other addresses of the loopback network (127.0.0.2, ...) stand for other
machines. The verdicts read what the server did (its /health, its answers, its log), never how long it took."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from tests.helpers import Server, read_answer, sent

pytest.importorskip("fastapi")

FLOOD = 80  # more than a lane holds waiting (lmlab.serving.lanes.MAX_WAITING, 64)


@pytest.fixture(scope="module")
def roomy(imported_gpt2):
    """A server that lets one address open every connection a flood needs."""
    started = Server(imported_gpt2, "--max-client-connections", str(FLOOD + 10))
    yield started
    started.stop()


def parse_lane(server: Server) -> dict:
    return server.health()["lanes"]["parse"]


def wait_for(what, check, timeout: float = 120):
    """`check()` once it is true (the server works at its own pace on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)
    return found


def answers(socks: list[socket.socket]) -> list[bytes]:
    """The answers already sent on `socks` (those still unanswered are left)."""
    ready = select.select(socks, [], [], 0)[0]
    return [sock.recv(65536) for sock in ready]


@pytest.mark.slow
def test_a_flooding_client_is_the_one_refused_and_its_abandoned_jobs_are_dropped(roomy):
    """A /tokenize flood from one address that fills the parse lane is what is refused (429, naming the address),
    never another address's completion, which is answered around the flood; a flooded job whose client is gone is
    dropped, not run."""
    body = json.dumps({"prompt": ("ROMEO: sweet night, thou art fair " * 30_000)[:900_000]}).encode()
    flood = [sent(roomy, "127.0.0.2", "/tokenize", body) for _ in range(FLOOD)]
    try:
        wait_for("a full parse lane", lambda: parse_lane(roomy)["waiting"] == 64)
        status, answer = read_answer(sent(roomy, "127.0.0.3", "/v1/completions",
                                          json.dumps({"prompt": "Hi", "max_tokens": 3}).encode()))
        assert status == 200 and answer["usage"]["completion_tokens"] <= 3, answer
        assert parse_lane(roomy)["waiting"] >= 32  # answered around the flood, not after it
        refused = wait_for("a 429 to the flood", lambda: [a for a in answers(flood) if a.startswith(b"HTTP/1.1 429")])
        assert b"server_busy" in refused[0] and b"of them from 127.0.0.2; retry shortly." in refused[0]
        waiting = parse_lane(roomy)["waiting"]
    finally:
        for sock in flood:
            sock.close()
    wait_for("an idle parse lane", lambda: parse_lane(roomy) == {"running": 0, "waiting": 0})
    lines = roomy.logged(lambda line: line.startswith("POST /tokenize "), FLOOD)
    dropped = [line for line in lines if line.startswith("POST /tokenize 499") and "(client left)" in line]
    assert len(dropped) >= waiting - 4, lines  # those waiting when their clients left, less any starting meanwhile
