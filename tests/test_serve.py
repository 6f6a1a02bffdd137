"""`lmlab serve` as a real process on a free local port, spoken to with the openai client (plain, streaming,
several choices, concurrent requests in one batch, bad requests), and `lmlab answer` + `lmlab judge` end to end
with that server as the judge; the batcher's queue bound in-process."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmlab.core.config import SamplingParams, seeded
from lmlab.core.errors import UserError
from lmlab.evals.judge import judge_answers, parse_score
from lmlab.inference.generate import Batch, TextStream, decode_dtype
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.serving.batcher import Batcher, Job, QueueFull
from lmlab.serving.requests import Request
from tests.helpers import ALPACA_TINY, LMLAB, Server, post, refusing_port

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(sft_run):
    started = Server(sft_run, "--max-tokens-cap", "64", "--max-batch", "8")
    yield started.url
    started.stop()


def expected(run: LoadedRun, prompt: list[int], **params) -> tuple[str, str, int]:
    """What the sampler itself gives for a request, decoded alone: text, finish reason and tokens generated."""
    stream = TextStream(run.model, run.tokenizer, prompt, SamplingParams(**params),
                        decode_dtype(run.device, run.dtype, compiled=False))
    return stream.text(), stream.finish_reason, stream.tokens


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
def test_the_openai_fields_clients_send_are_honoured(server, sft_run):
    client = openai.OpenAI(base_url=server, api_key="unused")
    assert client.models.retrieve("sft").id == "sft" and client.models.retrieve("sft").created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Repeat the word"},
                                             {"type": "text", "text": "twice."}]}]
    short = client.chat.completions.create(model="sft", messages=messages, max_completion_tokens=5, temperature=0)
    assert short.usage.completion_tokens <= 5 and short.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model="sft", messages=messages, max_completion_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == short.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == short.choices[0].message.content

    # n choices decode together, choice i drawn as seed + i draws alone
    many = client.completions.create(model="sft", prompt="ROMEO:", max_tokens=10, temperature=1.0, seed=3, n=3)
    run = RunDir(sft_run).load("best", "cpu")
    ids = run.tokenizer.encode("ROMEO:")
    alone = [expected(run, ids, **{**vars(p), "stop": ()}) for p in seeded(SamplingParams(10, 1.0, seed=3), 3)]
    apart = [(i, t, r) for i, (t, r, _) in enumerate(alone)]
    assert [(c.index, c.text, c.finish_reason) for c in many.choices] == apart
    assert many.usage.completion_tokens == sum(tokens for _, _, tokens in alone)

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sft", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "'image_url'" in caught.value.body["message"]


@pytest.mark.slow
def test_concurrent_requests_share_the_batch_and_get_what_each_gets_alone(server, sft_run):
    client = openai.OpenAI(base_url=server, api_key="unused")
    asks = [dict(prompt=p, max_tokens=m, temperature=t, seed=s)
            for p, m, t, s in [("ROMEO:", 30, 0, 0), ("JULIET: o", 12, 1.0, 5), ("", 25, 0.8, 9), ("NURSE", 40, 0, 0),
                               ("FRIAR: love", 20, 1.2, 1), ("x", 8, 0, 0)]]

    def ask(fields: dict) -> tuple[str, str, int]:
        done = client.completions.create(model="sft", **fields)
        return done.choices[0].text, done.choices[0].finish_reason, done.usage.completion_tokens

    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    run = RunDir(sft_run).load("best", "cpu")
    for fields, got in zip(asks, together):
        ids = run.tokenizer.encode(fields["prompt"]) if fields["prompt"] else [run.tokenizer.eot_id]
        assert got == expected(run, ids, max_new_tokens=fields["max_tokens"], temperature=fields["temperature"],
                               seed=fields["seed"])


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_survives(server):
    client = openai.OpenAI(base_url=server, api_key="unused")
    bad = [dict(temperature=5), dict(n=9), dict(max_tokens=65), dict(stop=[1, 2]), dict(top_p="high"),
           dict(best_of=2), dict(prompt="night " * 600)]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**{"model": "sft", "prompt": "x", "max_tokens": 4, **fields})
        error = caught.value.body
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    # JSON's false is not 0 nor true 1, as the OpenAPI document's enums have them (Python's == took them: ST201).
    for name, value in [("repetition_penalty", 1.1), ("min_p", 0.05), ("ignore_eos", True), ("foo", 1),
                        ("frequency_penalty", False), ("best_of", True), ("presence_penalty", [])]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="sft", prompt="x", max_tokens=2, extra_body={name: value})
        assert caught.value.body["param"] == name and f"`{name}`" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       max_completion_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sft", messages=[{"role": "wizard", "content": "hi"}])
    status, body = post(f"{server}/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(f"{server}/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(f"{server}/embeddings", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/completions" in body["error"]["message"]
    try:
        urllib.request.urlopen(f"{server}/completions", timeout=10)
    except urllib.error.HTTPError as err:
        assert err.code == 405 and json.loads(err.read())["error"]["code"] == "method_not_allowed"
    health = json.loads(urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=10).read())
    assert health["status"] == "ok" and health["model"] == "sft"
    assert client.completions.create(model="sft", prompt="x", max_tokens=2, temperature=0).choices  # still up


@pytest.mark.slow
def test_a_request_beyond_the_queue_is_refused_and_a_cancelled_one_leaves(sft_run):
    run = RunDir(sft_run).load("best", "cpu")
    # past_eot: only max_new_tokens ends a job, so the first one holds the one row until it is cancelled
    batch = Batch(run.model, run.tokenizer, 1, decode_dtype(run.device, run.dtype, False), past_eot=True)
    decoding, go_on = threading.Event(), threading.Event()
    params = [SamplingParams(max_new_tokens=64, temperature=0)]
    first = Job(Request([[0]], params))

    def publish(news, at) -> None:  # the first job's client reads its first piece and then holds the batcher
        if any(job is first for job, _ in news):
            decoding.set()
            go_on.wait(30)

    batcher = Batcher(batch, 1, publish)
    batcher.submit(first)
    assert decoding.wait(30)
    second = Job(Request([[0]], params))
    batcher.submit(second)  # waits for the one row
    with pytest.raises(QueueFull):
        batcher.submit(Job(Request([[0]], params)))
    assert batcher.load() == (1, 1)
    batcher.cancel(second)  # left the queue at once
    assert batcher.load() == (1, 0)
    batcher.cancel(first)
    go_on.set()
    deadline = time.monotonic() + 30
    while batcher.load() != (0, 0):
        assert time.monotonic() < deadline, "the cancelled job kept its row"
        time.sleep(0.01)
    assert first.choices[0].tokens < 64  # it left before its max_tokens


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
    items = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(items) == 3
    for item in items:  # the tiny judge writes noise: each item is scored from its reply, or asked twice
        if item["score"] is None:
            assert len(item["judge_replies"]) == 2 and all(parse_score(r) is None for r in item["judge_replies"])
        else:
            assert item["score"] == parse_score(item["judge_replies"][-1])
    scored = [i["score"] for i in items if i["score"] is not None]
    if not scored:  # the tiny judge wrote no number at all (or was refused): said in one sentence, status 2
        assert done.returncode == 2 and "scored none of the 3 answers: " in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert f"mean score {sum(scored) / len(scored):.1f} over {len(scored)} of 3 answers scored" in done.stdout

    with refusing_port() as port, pytest.raises(UserError, match="cannot reach the judge"):
        judge_answers(answers, f"http://127.0.0.1:{port}/v1", "sft", tmp_path / "never.jsonl")
