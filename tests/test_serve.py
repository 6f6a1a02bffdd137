"""`lmlab serve` as a real process on a free local port, spoken to with the openai client (plain, streaming
and bad requests), and `lmlab answer` + `lmlab judge` end to end with that server as the judge."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmlab.config import FinetuneConfig, SamplingParams
from lmlab.errors import UserError
from lmlab.finetune import finetune
from lmlab.generate import TextStream
from lmlab.judge import judge_answers, parse_score
from lmlab.rundir import LoadedRun, RunDir
from lmlab.serve import ApiError, Request, complete, load_served
from tests.conftest import ALPACA_TINY, LMLAB

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, imported_gpt2) -> Path:
    run = tmp_path_factory.mktemp("runs") / "sft"
    finetune(imported_gpt2, run, FinetuneConfig(str(ALPACA_TINY), epochs=1, learning_rate=3e-3), device="cpu")
    return run


@pytest.fixture(scope="module")
def server(sft_run):
    port = free_port()
    proc = subprocess.Popen([LMLAB, "serve", sft_run, "--port", str(port), "--device", "cpu", "--max-tokens-cap", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def expected(run: LoadedRun, prompt: list[int], **params) -> tuple[str, str, int]:
    """What the sampler itself gives for a request: text, finish reason and tokens generated."""
    stream = TextStream(run.model, run.tokenizer, prompt, SamplingParams(**params), run.dtype)
    return stream.text(), stream.finish_reason, stream.tokens


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_completions_chat_streaming_and_sampling_controls(server, sft_run):
    client = openai.OpenAI(base_url=server, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["sft"]
    greedy = client.completions.create(model="sft", prompt="ROMEO: sweet", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    run = RunDir(sft_run).load("best", "cpu")  # what the server runs, in this process
    assert (text, greedy.choices[0].finish_reason, greedy.usage.completion_tokens) == \
        expected(run, run.tokenizer.encode("ROMEO: sweet"), max_new_tokens=12, temperature=0)
    streamed = client.completions.create(model="sft", prompt="ROMEO: sweet", max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text
    if len(text) >= 4:  # the same greedy text, cut before a stop string taken from it
        stop = text[2:4]
        cut = client.completions.create(model="sft", prompt="ROMEO: sweet", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="sft", prompt="ROMEO:", max_tokens=10, temperature=1.0, top_p=0.9,
                                         extra_body={"top_k": 50}, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed samples the same text

    messages = [{"role": "user", "content": "Repeat the word twice."}]
    chat = client.chat.completions.create(model="sft", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="sft", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_survives(server):
    client = openai.OpenAI(base_url=server, api_key="unused")
    bad = [dict(temperature=5), dict(n=2), dict(max_tokens=65), dict(stop=[1, 2]), dict(top_p="high"),
           dict(echo=True), dict(prompt="night " * 600)]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**{"model": "sft", "prompt": "x", "max_tokens": 4, **fields})
        error = caught.value.body
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sft", messages=[{"role": "wizard", "content": "hi"}])
    status, body = post(f"{server}/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(f"{server}/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="sft", prompt="x", max_tokens=2, temperature=0).choices  # still up


def test_a_request_beyond_max_concurrent_gets_429(sft_run):
    served = load_served(sft_run, device="cpu", max_concurrent=1)
    request = Request([0], SamplingParams(max_new_tokens=2, temperature=0.0, seed=0), False)
    assert served.slots.acquire(blocking=False)  # one request is generating
    with pytest.raises(ApiError) as caught:
        complete(served, request, chat=False)
    assert caught.value.status == 429 and caught.value.body()["error"]["type"] == "rate_limit_exceeded"
    served.slots.release()
    answer = complete(served, request, chat=False)
    assert (answer["choices"][0]["text"], answer["choices"][0]["finish_reason"],
            answer["usage"]["completion_tokens"]) == expected(served.run, [0], max_new_tokens=2, temperature=0.0)


def test_judge_replies_are_parsed_for_the_first_integer_in_range():
    assert parse_score("87") == 87
    assert parse_score("Score: 87/100") == 87
    assert parse_score("I'd say 150, no, 90.") == 90
    assert parse_score("100") == 100 and parse_score("0") == 0
    assert parse_score("about 7.5 out of ten") is None and parse_score("Score: 87.") == 87
    assert parse_score("excellent!") is None and parse_score("") is None


@pytest.mark.slow
def test_answer_and_judge_end_to_end_with_lmlab_serve_as_the_judge(tmp_path, sft_run, server):
    data = tmp_path / "three.json"
    data.write_text(json.dumps(json.loads(ALPACA_TINY.read_text())[:3]))
    answers, scores = tmp_path / "answers.jsonl", tmp_path / "scores.jsonl"
    done = subprocess.run([LMLAB, "answer", sft_run, "--data", data, "--out", answers, "--max-new-tokens", "8",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["instruction"] for r in records] == [r["instruction"] for r in json.loads(data.read_text())]
    assert all(isinstance(r["model_answer"], str) for r in records)

    done = subprocess.run([LMLAB, "judge", "--answers", answers, "--endpoint", server, "--model", "sft",
                           "--out", scores, "--max-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(items) == 3
    for item in items:  # the tiny judge writes noise: each item is scored from its reply, or asked twice
        if item["score"] is None:
            assert len(item["judge_replies"]) == 2 and all(parse_score(r) is None for r in item["judge_replies"])
        else:
            assert item["score"] == parse_score(item["judge_replies"][-1])
    scored = [i["score"] for i in items if i["score"] is not None]
    assert f"over {len(scored)} of 3 answers scored" in done.stdout
    mean = "-" if not scored else f"{sum(scored) / len(scored):.1f}"
    assert f"mean score {mean}" in done.stdout

    with pytest.raises(UserError, match="cannot reach the judge"):
        judge_answers(answers, f"http://127.0.0.1:{free_port()}/v1", "sft", tmp_path / "never.jsonl")
