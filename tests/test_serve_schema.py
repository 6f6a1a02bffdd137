"""/openapi.json of `lmlab serve` against schemathesis on a real server, every check: every request body it
describes is one the server takes, every body it forbids one the server refuses with a 4xx, every status the server
answers with is documented (the 400s too), and nothing it is sent, described or not, gets a 5xx, on a fine-tuned
byte-level BPE run (its prompt format wants a user's message). One run keeps it cheap. By hand (`st run
URL/openapi.json --checks all`) a char run and an imported chat template's pass too, but for the documented 400s
JSON Schema cannot state: a chat longer than a short context, say, which schemathesis counts against the server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lmlab.run.rundir import RunDir
from tests.helpers import Server, post

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

from jsonschema import Draft202012Validator  # noqa: E402 (schemathesis brings it)

ST = str(Path(sys.executable).with_name("st"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft_run"])
def test_the_openapi_document_describes_what_the_server_takes_and_answers(request, tmp_path, kind):
    server = Server(request.getfixturevalue(kind), "--max-tokens-cap", "8", "--max-batch", "4")
    try:
        done = subprocess.run([ST, "run", f"{server.root}/openapi.json", "--checks", "all", "--max-examples", "10",
                               "--seed", "0", "--phases", "coverage,fuzzing", "--no-color"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-4000:]


def body_schema(server: Server, path: str) -> dict:
    document = json.loads(urllib.request.urlopen(f"{server.root}/openapi.json", timeout=60).read())
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


@pytest.mark.slow
def test_the_document_allows_the_chats_the_server_takes_and_forbids_those_it_refuses(writing_char_run):
    """A chat is described as the server reads it: messages of any length and number, text in parts, one of
    `max_tokens` and `max_completion_tokens`. What the document cannot say, the tokens the chat renders to, is the
    documented 400 context_length_exceeded."""
    server = Server(writing_char_run)
    try:
        allows = Draft202012Validator(body_schema(server, "/v1/chat/completions")).is_valid
        uneven = [{"role": "system", "content": "the " * 10},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        for messages, more, status in (
                (uneven, {"max_tokens": 1}, 200),
                ([{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}], {}, 400),
                (uneven, {"max_tokens": 1, "max_completion_tokens": 1}, 400)):
            body = {"messages": messages, **more}
            got, answer = post(f"{server.url}/chat/completions", json.dumps(body).encode())
            assert (got, allows(body)) == (status, status == 200), (body, answer)
        longest = [{"role": "user", "content": "a" * RunDir(writing_char_run).config().model.block_size}]
        got, answer = post(f"{server.url}/chat/completions", json.dumps({"messages": longest}).encode())
        assert allows({"messages": longest}) and got == 400 and answer["error"]["code"] == "context_length_exceeded"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_char_runs_prompt_is_bounded_as_the_server_bounds_it(writing_char_run):
    """A tokenizer of one token a character, adding none, is described exactly: the longest prompt the document
    allows is the longest the server takes."""
    server = Server(writing_char_run)
    try:
        prompt = body_schema(server, "/v1/completions")["properties"]["prompt"]
        longest = prompt["anyOf"][0]["anyOf"][0]["maxLength"]
        assert longest == RunDir(writing_char_run).config().model.block_size
        for length, status in ((longest, 200), (longest + 1, 400)):
            got, _ = post(f"{server.url}/completions", json.dumps({"prompt": "a" * length, "max_tokens": 1}).encode())
            assert got == status, length
    finally:
        server.stop()
