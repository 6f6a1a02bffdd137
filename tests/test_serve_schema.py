"""/openapi.json of `lmlab serve` against schemathesis on a real server: every request body it
describes is one the server takes, every status the server answers with is documented (the 400s too), and nothing
it is sent, described or not, gets a 5xx, on a fine-tuned byte-level BPE run (its prompt format wants a user's
message). One run keeps it cheap; benchmarks-style runs by hand on a char run (its characters only, a chat of few
messages in a short context) and an imported chat template's pass too (`st run URL/openapi.json`)."""

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

ST = str(Path(sys.executable).with_name("st"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft_run"])
def test_the_openapi_document_describes_what_the_server_takes_and_answers(request, tmp_path, kind):
    server = Server(request.getfixturevalue(kind), "--max-tokens-cap", "8", "--max-batch", "4")
    try:
        # Schema-violating bodies the server takes are not counted (negative_data_rejection): the document is
        # stricter than the server where JSON Schema cannot say what it checks (a prompt's tokens, say).
        done = subprocess.run([ST, "run", f"{server.root}/openapi.json", "--max-examples", "10", "--seed", "0",
                               "--phases", "coverage,fuzzing",
                               "--exclude-checks", "negative_data_rejection", "--no-color"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.mark.slow
def test_a_chat_of_as_many_messages_as_the_context_holds_is_described(writing_char_run):
    """Before: the document allowed 4 messages, where the server took 5 and more. Described now: up to the most that
    fit the context with some text in each, each count with its own bound, and the longest chat of each the
    document allows is one the server takes."""
    server = Server(writing_char_run)
    try:
        document = json.loads(urllib.request.urlopen(f"{server.root}/openapi.json", timeout=60).read())
        body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
        chat = body["schema"]["properties"]["messages"]
        longest = {shape["maxItems"]: shape["items"]["properties"]["content"]["anyOf"][0]["maxLength"]
                   for shape in chat.get("anyOf", [chat])}
        assert max(longest) > 4 and longest[1] > longest[max(longest)] >= 1  # the fewer, the longer each
        for count, chars in longest.items():  # the role that takes most, every message as long as it may be
            turns = [{"role": "assistant", "content": "a" * chars}] * count
            status, answer = post(f"{server.url}/chat/completions",
                                  json.dumps({"messages": turns, "max_tokens": 1}).encode())
            assert status == 200, (count, chars, answer)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_char_runs_prompt_is_bounded_as_the_server_bounds_it(writing_char_run):
    """Before: the document kept two tokens for special tokens a char tokenizer never adds, so a prompt of the
    whole context broke it and the server took it (schemathesis: ST201). A tokenizer of one token a character is
    described exactly: the longest prompt the document allows is the longest the server takes."""
    server = Server(writing_char_run)
    try:
        document = json.loads(urllib.request.urlopen(f"{server.root}/openapi.json", timeout=60).read())
        body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
        longest = body["schema"]["properties"]["prompt"]["anyOf"][0]["anyOf"][0]["maxLength"]
        assert longest == RunDir(writing_char_run).config().model.block_size
        for length, status in ((longest, 200), (longest + 1, 400)):
            got, _ = post(f"{server.url}/completions", json.dumps({"prompt": "a" * length, "max_tokens": 1}).encode())
            assert got == status, length
    finally:
        server.stop()
