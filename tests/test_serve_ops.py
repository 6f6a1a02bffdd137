"""`lmlab serve` as an operator runs it, against real server processes on 127.0.0.1: a start that binds at once
and says what it loads, a compiled step kept on disk for the next start, Prometheus' /metrics, vLLM's /tokenize
and /detokenize, model names and context length, an API key (and the refusal to serve beyond loopback without
one), and SIGTERM/SIGINT draining to exit 0."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmlab.core.config_toml import load_config
from lmlab.core.fileio import sha256_file
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import LMLAB, serve_process, write_config

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

KEY = "sk-test-0123456789"


class Process:
    """`lmlab serve RUN OPTIONS` on the port the system gives it, watched from the moment it says which: every
    /health answer until the first 200 (`starts`), and its stderr lines (`log`)."""

    def __init__(self, run: Path, *options: str, ready: bool = True, env: dict | None = None):
        self.proc, self.port, self.log = serve_process([LMLAB, "serve", run, "--device", "cpu", *options],
                                                       None if env is None else {**os.environ, **env})
        self.root, self.url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port}/v1"
        self.starts: list[tuple[int, dict]] = []
        if ready:
            self.wait(lambda health: True)

    def wait_for_log(self, start: str, holds=lambda line: True, timeout: float = 30) -> str:
        """The first line of the log that starts with `start` (and `holds`), once it is written."""
        deadline = time.monotonic() + timeout
        while not (found := [line for line in self.log if line.startswith(start) and holds(line)]):
            assert time.monotonic() < deadline, self.log[-5:]
            time.sleep(0.05)
        return found[0]

    def wait(self, done, timeout: float = 120) -> dict:
        """Poll /health until it answers 200 with a body `done` accepts; returns that body."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = get(f"{self.root}/health")
            if status is not None:
                self.starts.append((status, body))
            if status == 200 and done(body):
                return body
            assert self.proc.poll() is None, "".join(self.log)
            assert time.monotonic() < deadline, f"not ready within {timeout} s: {self.starts[-1:]} {self.log}"
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=30)


def get(url: str, headers: dict | None = None) -> tuple[int | None, dict | str]:
    """Status and body (JSON, else text) of a GET; None when nothing answers."""
    return call(urllib.request.Request(url, headers=headers or {}))


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int | None, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}))


def call(request: urllib.request.Request) -> tuple[int | None, dict | str]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except OSError:  # refused, reset, or timed out while the server imports torch
        return None, ""
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def keyed(sft_run):
    started = Process(sft_run, "--no-compile", "--api-key", KEY, "--served-model-name", "tiny-sft", "sft-alias",
                      "--max-tokens-cap", "64", "--max-batch", "4")
    yield started
    started.stop()


@pytest.mark.slow
def test_the_port_answers_at_once_and_health_says_loading_until_ready(keyed):
    loading = [body for status, body in keyed.starts if status == 503]
    assert loading, "the first answer came when the model was already loaded"
    assert all(b["status"] == "loading" and b["phase"] and b["model"] == "tiny-sft" for b in loading)
    assert keyed.starts[-1][1]["status"] == "ok" and keyed.starts[-1][1]["decode_step"] == "eager"
    # The server says it is ready before /health does; this process reads its log from a pipe, in a thread.
    keyed.wait_for_log("lmlab serve: ready", lambda line: "after the command" in line)
    lines = [line for line in keyed.log if line.startswith("lmlab serve: ")]
    assert any(" in " in line and line.rstrip().endswith("s") and "loaded" in line for line in lines), lines


@pytest.mark.slow
def test_the_api_loads_behind_a_503_with_retry_after(sft_run):
    server = Process(sft_run, "--no-compile", ready=False)
    try:
        deadline = time.monotonic() + 60
        while (answer := post(f"{server.url}/completions", {"prompt": "x", "max_tokens": 1}))[0] is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = answer
        if status == 503:  # the model loaded before the port was first reached: nothing to see (a fast machine)
            assert body["error"]["code"] == "model_loading" and "loading" in body["error"]["message"]
        server.wait(lambda health: True)
        assert post(f"{server.url}/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_the_compiled_step_is_built_behind_eager_decoding_and_kept_for_the_next_start(sft_run, tmp_path):
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = Process(sft_run, "--compile", "--max-batch", "2", env=cache)
    try:
        assert first.starts[-1][1]["decode_step"] == "eager, compiling"  # ready before the compiler is done
        client = openai.OpenAI(base_url=first.url, api_key="unused")
        assert client.completions.create(model="sft", prompt="ROMEO:", max_tokens=4).usage.completion_tokens
        first.wait(lambda health: health["decode_step"] != "eager, compiling", timeout=600)
        assert first.starts[-1][1]["decode_step"] == "compiled", first.log
        eager_free = client.completions.create(model="sft", prompt="ROMEO:", max_tokens=6, temperature=0)
    finally:
        assert first.stop() == 0
    folder = tmp_path / "cache" / "lmlab" / "compiled"
    (kept,) = folder.glob("*.pt2")
    digest = sha256_file(kept)
    assert (folder / f"{kept.stem}.sha256").read_text() == f"{digest}  {kept.name}\n"  # `sha256sum -c` reads it
    good = {path.name: path.read_bytes() for path in folder.iterdir()}
    again = Process(sft_run, "--compile", "--max-batch", "2", env=cache)
    try:
        first = again.starts[-1][1]
        assert first["decode_step"] == "compiled"  # from its first 200: nothing compiled again
        assert first["compiled_step"] == {"file": str(kept), "sha256": digest}  # which step, as checked
        assert any("loaded the kept compiled step" in line for line in again.log), again.log
        client = openai.OpenAI(base_url=again.url, api_key="unused")
        assert client.completions.create(model="sft", prompt="ROMEO:", max_tokens=6, temperature=0).choices[0].text \
            == eager_free.choices[0].text  # the same compiled step: the same greedy text
    finally:
        assert again.stop() == 0
    damaged = bytearray(good[kept.name])
    # a damaged byte never loads, says "compiled" and decodes junk
    for at in range(len(damaged) // 3, len(damaged) // 3 + 2000):
        damaged[at] ^= 0xFF
    kept.write_bytes(damaged)
    assert refused_at_start(sft_run, cache, "is not the one built there") and not kept.exists()
    for name, data in good.items():  # the good step back, in a folder anyone may write
        (folder / name).write_bytes(data)
    folder.chmod(0o777)
    assert refused_at_start(sft_run, cache, "the folder is writable by others")


@pytest.mark.slow
def test_a_compiler_process_that_crashes_keeps_nothing_and_the_server_decodes_on(sft_run, tmp_path):
    # On CUDA with torch 2.11 (an H200 and an H100) loading a built package segfaulted: the step is loaded and run in
    # the compiler's process before it is kept, so a crash there is this one, a compiler killed by SIGSEGV.
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    server = Process(sft_run, "--compile", "--max-batch", "2", env=cache)
    try:
        server.wait_for_log("lmlab serve: compiling the decode step in the background")
        deadline = time.monotonic() + 30
        while not (compiler := children(server.proc.pid)):
            assert time.monotonic() < deadline, server.log
            time.sleep(0.01)
        os.kill(int(compiler[0]), signal.SIGSEGV)
        line = server.wait_for_log("lmlab serve: compiling the decode step failed")
        assert line.startswith("lmlab serve: compiling the decode step failed (its process was killed by SIGSEGV); "
                               "decoding eagerly"), line
        assert server.wait(lambda health: True)["decode_step"] == "eager"
        client = openai.OpenAI(base_url=server.url, api_key="unused")
        assert client.completions.create(model="sft", prompt="ROMEO:", max_tokens=3).usage.completion_tokens
    finally:
        assert server.stop() == 0
    assert not list((tmp_path / "cache" / "lmlab" / "compiled").glob("*.pt2"))  # nothing kept to crash the next start


def children(pid: int) -> list[str]:
    """The processes `pid`'s threads started (the compiler is a child of the loading thread), as /proc lists them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found += (task / "children").read_text().split()
    return found


def refused_at_start(run: Path, env: dict, why: str) -> bool:
    """Whether a server started on `run` decodes without the kept compiled step from its first 200, saying `why`."""
    server = Process(run, "--compile", "--max-batch", "2", env=env)
    try:
        first = server.starts[-1][1]
        server.wait_for_log("lmlab serve: ", lambda line: why in line)
        return first["decode_step"] != "compiled" and first["compiled_step"] is None
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_an_api_key_guards_every_route_but_health_and_metrics(keyed):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=keyed.url, api_key="sk-wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}):
        status, body = post(f"{keyed.root}/tokenize", {"prompt": "x"}, headers)
        assert status == 401 and body["error"]["type"] == "invalid_request_error", (headers, body)
    assert get(f"{keyed.root}/health")[0] == 200 and get(f"{keyed.root}/metrics")[0] == 200
    client = openai.OpenAI(base_url=keyed.url, api_key=KEY)
    assert client.completions.create(model="tiny-sft", prompt="ROMEO:", max_tokens=3).choices


def answer_until_closed(server: Process, request: bytes) -> bytes:
    """Everything the server sends for a raw `request` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        got = b""
        while piece := sock.recv(4096):
            got += piece
    return got


@pytest.mark.slow
def test_a_wrong_key_closes_its_connection_and_the_log_escapes_what_a_path_decodes_to(keyed):
    # %0A decodes to a newline: unescaped, the rest of the path was a line of its own in the log, a forged request.
    forged = b"/v1/models%0AGET%20/admin%20200%200.001s"
    said = answer_until_closed(keyed, b"GET " + forged + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n")
    assert said.startswith(b"HTTP/1.1 401") and b"\r\nconnection: close\r\n" in said.lower()
    keyed.wait_for_log(f"GET {forged.decode()} 401 ")
    assert not any(line.startswith("GET /admin") for line in keyed.log)


@pytest.mark.slow
def test_an_api_key_beyond_ascii_is_compared_as_the_utf_8_a_client_sends(sft_run):
    key = "clé-ü-秘密"
    server = Process(sft_run, "--no-compile", "--api-key", key)
    try:
        double = key.encode("utf-8").decode("latin-1").encode("utf-8")  # what the server compared before
        for sent, status in ((key.encode("utf-8"), b"200"), (key.encode("utf-8")[:-1], b"401"), (double, b"401")):
            said = answer_until_closed(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                       b"Authorization: Bearer " + sent + b"\r\n\r\n")
            assert said.startswith(b"HTTP/1.1 " + status), (sent, said[:200])
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_served_model_names_and_the_context_length(keyed, sft_run):
    client = openai.OpenAI(base_url=keyed.url, api_key=KEY)
    models = client.models.list().data
    context = RunDir(sft_run).config().model.block_size
    assert [(m.id, m.max_model_len) for m in models] == [("tiny-sft", context), ("sft-alias", context)]
    assert client.models.retrieve("sft-alias").max_model_len == context
    done = client.completions.create(model="sft-alias", prompt="ROMEO:", max_tokens=2)
    assert done.model == "tiny-sft"  # the first name answers, as vLLM does
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sft", prompt="ROMEO:", max_tokens=2)  # the run's name is not served


@pytest.mark.slow
def test_tokenize_and_detokenize_in_vllms_shapes(keyed, sft_run):
    auth = {"Authorization": f"Bearer {KEY}"}
    tokenizer = RunDir(sft_run).tokenizer()
    context = RunDir(sft_run).config().model.block_size
    text = "ROMEO: sweet night " * context  # longer than the context: counted, not refused
    status, body = post(f"{keyed.root}/tokenize", {"model": "tiny-sft", "prompt": text}, auth)
    assert status == 200 and body == {"count": len(tokenizer.encode(text)), "max_model_len": context,
                                      "tokens": tokenizer.encode(text), "token_strs": None}
    assert body["count"] > context
    status, body = post(f"{keyed.root}/tokenize", {"prompt": "ROMEO:", "return_token_strs": True}, auth)
    assert body["token_strs"] == [tokenizer.backend.id_to_token(i) for i in body["tokens"]]
    assert post(f"{keyed.root}/detokenize", {"tokens": body["tokens"]}, auth) == (200, {"prompt": "ROMEO:"})
    status, chat = post(f"{keyed.root}/tokenize", {"messages": [{"role": "user", "content": "Say hi."}]}, auth)
    assert status == 200 and chat["count"] == len(chat["tokens"]) > 0
    bad = [({"prompt": 7}, 400, "prompt"), ({"prompt": ["x"]}, 400, "prompt"), ({}, 400, "prompt"),
           ({"prompt": "x", "messages": []}, 400, "prompt"), ({"prompt": "x", "add_special_tokens": "yes"}, 400,
           "add_special_tokens"), ({"prompt": "x", "truncate": 5}, 400, "truncate"),
           ({"prompt": "x", "model": "gpt-4"}, 404, "model"), (b"[1, 2]", 400, None), (b"{nope", 400, None)]
    for request, want, param in bad:
        status, body = post(f"{keyed.root}/tokenize", request, auth)
        assert status == want and body["error"]["param"] == param and body["error"]["message"], (request, body)
    # 2 MB announced, none sent: refused from the header alone (a client still uploading when the server closed
    # the connection was reset before it read the 413, now and then)
    said = answer_until_closed(keyed, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 2000000\r\n\r\n")
    assert said.startswith(b"HTTP/1.1 413") and b"request_too_large" in said
    for tokens in ([-1], [tokenizer.vocab_size], [1.5], [True], "1 2", None):
        status, body = post(f"{keyed.root}/detokenize", {"tokens": tokens}, auth)
        assert status == 400 and body["error"]["param"] == "tokens", (tokens, body)
    assert post(f"{keyed.root}/detokenize", {"tokens": []}, auth) == (200, {"prompt": ""})


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, by name and labels, read by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_latencies_in_prometheus_text(keyed):
    before = metric_values(get(f"{keyed.root}/metrics")[1])
    client = openai.OpenAI(base_url=keyed.url, api_key=KEY)
    done = [client.completions.create(model="tiny-sft", prompt="ROMEO:", max_tokens=m, temperature=0) for m in (5, 9)]
    streamed = list(client.completions.create(model="tiny-sft", prompt="ROMEO:", max_tokens=6, stream=True,
                                              stream_options={"include_usage": True}))
    post(f"{keyed.root}/tokenize", {"prompt": 5}, {"Authorization": f"Bearer {KEY}"})
    after = metric_values(get(f"{keyed.root}/metrics")[1])

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    generated = sum(d.usage.completion_tokens for d in done) + streamed[-1].usage.completion_tokens
    assert grew("lmlab_requests_total", endpoint="/v1/completions", status="200") == 3
    assert grew("lmlab_requests_total", endpoint="/tokenize", status="400") == 1
    assert grew("lmlab_generation_tokens_total") == generated
    assert grew("lmlab_prompt_tokens_total") == 3 * done[0].usage.prompt_tokens
    assert grew("lmlab_time_to_first_token_seconds_count") == 3
    assert grew("lmlab_inter_token_latency_seconds_count") == generated - 3  # every token after a request's first
    assert grew("lmlab_e2e_request_latency_seconds_count") == 3
    assert after[("lmlab_num_requests_running", ())] == 0 and after[("lmlab_max_batch", ())] == 4
    assert after[("lmlab_ready", ())] == 1
    info = next(dict(labels) for (name, labels), _ in after.items() if name == "lmlab_server_info")
    assert info["model"] == "tiny-sft" and info["decode_step"] == "eager"


def scrapes(server: Process, count: int = 64) -> list[tuple[int, float]]:
    """`count` scrapers of /metrics at once: each one's status and seconds."""
    def scrape(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        status, _ = get(f"{server.root}/metrics")
        return status, time.perf_counter() - started

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(scrape, range(count)))


@pytest.mark.slow
def test_metrics_answers_64_concurrent_scrapers(keyed):
    assert all(status == 200 for status, _ in scrapes(keyed))
    assert get(f"{keyed.root}/health")[0] == 200  # unharmed


@pytest.mark.slow
@pytest.mark.serial
def test_metrics_answers_64_concurrent_scrapers_within_a_second(keyed):
    seconds = sorted(seconds for _, seconds in scrapes(keyed))
    assert seconds[-1] < 1.0, seconds[-5:]


@pytest.mark.parametrize("options, says", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--host", "192.168.1.10"], "--insecure"),
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "   "], "--api-key is empty"),
    (["--served-model-name", "two words"], "--served-model-name"),
    (["--served-model-name", "a", "a"], "--served-model-name"),
    ([], "not an lmlab run"),
])
@pytest.mark.slow
def test_serving_beyond_loopback_needs_a_key_and_a_bad_key_or_name_is_refused(tmp_path, options, says):
    done = subprocess.run([LMLAB, "serve", str(tmp_path / "no-run"), "--port", "0", *options],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr


@pytest.fixture(scope="session")
def char_run(tmp_path_factory, char_dataset) -> Path:
    """A tiny char-level run: it has no end-of-text token, so it decodes until max_tokens."""
    root = tmp_path_factory.mktemp("drain")
    config = load_config(write_config(root / "tiny.toml", char_dataset, max_iters=10))
    return Trainer(train_job(config, root / "run", "cpu")).run().run_dir


def stream_and_signal(server: Process, signals: list[int], max_tokens: int) -> tuple[list[dict], bool]:
    """A streamed completion: after its first chunk the server gets `signals`, one after another; the chunks it
    read, and whether it saw [DONE]."""
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": max_tokens, "stream": True, "temperature": 1.0}).encode()
    request = urllib.request.Request(f"{server.url}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    chunks, done = [], False
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 1:
                        for sig in signals:
                            server.proc.send_signal(sig)
                            time.sleep(0.3)
                done = done or line.strip() == b"data: [DONE]"
    except (ConnectionError, urllib.error.URLError, http.client.IncompleteRead):
        pass
    return chunks, done


@pytest.mark.slow
@pytest.mark.parametrize("drain, max_tokens, reason", [("30", 200, "length"), ("0", 100_000, "abort")])
def test_sigterm_drains_running_streams_then_exits_0(char_run, drain, max_tokens, reason):
    server = Process(char_run, "--no-compile", "--drain-seconds", drain, "--max-tokens-cap", "100000")
    chunks, done = stream_and_signal(server, [signal.SIGTERM], max_tokens)
    assert done and chunks[-1]["choices"][0]["finish_reason"] == reason
    if reason == "length":
        assert sum(len(c["choices"][0]["text"]) for c in chunks) == max_tokens  # one character per token
    assert server.proc.wait(timeout=30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert any("draining" in line for line in server.log) and any("stopped" in line for line in server.log)


@pytest.mark.slow
def test_a_second_signal_stops_at_once(char_run):
    server = Process(char_run, "--no-compile", "--drain-seconds", "600", "--max-tokens-cap", "100000")
    started = time.monotonic()
    chunks, done = stream_and_signal(server, [signal.SIGTERM, signal.SIGINT], 100_000)
    assert server.proc.wait(timeout=30) == 1 and time.monotonic() - started < 30
    assert not done and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert any("second signal" in line for line in server.log)


LOG_FROM_THREADS = """
import sys, threading
from lmlab.serving.state import State
sys.setswitchinterval(1e-6)  # threads switch as often as they can
log = State(["m"], None, lambda state: None).log
threads = [threading.Thread(target=lambda i=i: [log(f"thread {i} line {j}") for j in range(1000)]) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def test_the_server_log_keeps_each_line_whole_whatever_threads_write_it():
    """Each line of the server's log reaches stderr whole, whatever threads write it: never two run together (an
    access log's line and a background start's), which an operator's grep and a test waiting for the line would
    miss. Here 8 threads write 1,000 lines each to a real pipe."""
    done = subprocess.run([sys.executable, "-c", LOG_FROM_THREADS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert sorted(lines) == sorted(f"thread {i} line {j}" for i in range(8) for j in range(1000))


LOG_WHILE_SIGNALLED = """
import signal
from lmlab.serving.state import State
log = State(["m"], None, lambda state: None).log
signal.signal(signal.SIGUSR1, lambda sig, frame: log("a stop signal's line"))  # as the server's drain says so
print("ready", flush=True)
for i in range(1000000):
    log(f"line {i}")
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
"""


@pytest.mark.slow
def test_a_signal_whose_handler_logs_while_the_log_writes_does_not_hang_the_server():
    """A stop signal's handler, which says the server drains, may run in the main thread while it holds the log's
    lock for the access log: the log takes it again (reentrant) and `lmlab serve` stops. Here signals land on a
    process writing its log as fast as it can."""
    proc = subprocess.Popen([sys.executable, "-c", LOG_WHILE_SIGNALLED], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        for _ in range(30):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.01)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
