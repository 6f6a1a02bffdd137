"""Property-based tests (Hypothesis) of the two parsers a user's or a client's text reaches first: the OpenAI request
parser of `lmlab serve` and the `--set section.key=value` overrides. Whatever they are given, the answer is a
request or a config, or a refusal with a message (a 400/404 the server can send, a one-line UserError: exit 2),
never another exception (a 500, a traceback)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.core.config_toml import SECTIONS, load_config, load_finetune_config
from lmlab.core.errors import UserError
from lmlab.run.rundir import RunDir
from lmlab.serving.edge import ServeOptions
from lmlab.serving.openai_api import ApiError
from tests.helpers import write_config

pytest.importorskip("fastapi")

from lmlab.inference.generate import document_start  # noqa: E402
from lmlab.serving.requests import (  # noqa: E402 (after the skip: serve needs fastapi)
    Request,
    Served,
    parse_request,
    read_request,
    render_chat,
)

EXAMPLES = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text of every kind: lone surrogates (what a JSON "\ud800" decodes to), controls, any plane.
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
NUMBERS = st.one_of(st.integers(), st.integers(min_value=2**53, max_value=10**40), st.floats(), st.just(-0.0))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stream_options", "stop", "seed", "logprobs", "echo", "user", "logit_bias", "tools", "suffix"]
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer"]),
                                                   VALUES),
                                 "content": st.one_of(TEXT, VALUES, st.lists(st.fixed_dictionaries(
                                     {"type": st.one_of(st.just("text"), VALUES), "text": VALUES})))})
BODIES = st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXT), st.one_of(
    VALUES, st.lists(MESSAGE, max_size=3), st.integers(1, 64)), max_size=6)


def raw(body: object) -> st.SearchStrategy[bytes]:
    """A body as a client sends it: JSON (ensure_ascii escapes a surrogate as \\ud800), or cut, or nested deep."""
    text = json.dumps(body)
    return st.one_of(st.just(text.encode()), st.just(text[:len(text) // 2].encode()),
                     st.integers(1, 3000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
                     st.binary(max_size=20))


@pytest.fixture(scope="module")
def served(imported_gpt2) -> Served:
    """The parser's view of a served run (byte-level BPE, a context of 512), without a batcher: nothing decodes."""
    run = RunDir(imported_gpt2).load("best", "cpu")
    longest = max(len(token) for token in run.tokenizer.vocab)
    options = ServeOptions(imported_gpt2, max_tokens_cap=64, max_batch=4, max_body_bytes=1_000_000)
    return Served(run, None, options, created=0,
                  max_prompt_chars=run.config.model.block_size * longest, empty_prompt=document_start(run.tokenizer))


def parsed(served: Served, raw: bytes, chat: bool) -> Request:
    """A body through the server's stages, one after another (the server runs each in a lane)."""
    body = read_request(["gpt2"], raw, "chat" if chat else "completions")
    return parse_request(served, body, render_chat(served, body.turns) if chat else None)


@EXAMPLES
@given(body=BODIES.flatmap(raw), chat=st.booleans())
@pytest.mark.slow
def test_the_request_parser_answers_every_body_with_a_request_or_a_400(served, body, chat):
    try:
        request = parsed(served, body, chat)
    except ApiError as err:
        assert err.status in (400, 404) and err.message, err
        json.dumps(err.body(), ensure_ascii=False).encode("utf-8")  # as the response sends it: no lone surrogate
        return
    assert isinstance(request, Request) and all(request.prompts)
    assert 1 <= len(request.params) <= served.options.max_batch


@EXAMPLES
@given(body=st.fixed_dictionaries({"prompt": TEXT}, optional={
    "max_tokens": st.integers(-5, 100), "temperature": NUMBERS, "n": st.integers(0, 6), "seed": st.integers(),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5))}))
@pytest.mark.slow
def test_a_well_formed_body_gets_a_request_or_a_400_naming_a_field(served, body):
    try:
        parsed(served, json.dumps(body).encode(), chat=False)
    except ApiError as err:
        assert err.status == 400 and err.param in (*body, None), err.body()


SETTING_VALUES = st.one_of(
    TEXT, st.integers().map(str), st.integers(20, 6000).map(lambda digits: "9" * digits), st.floats().map(repr),
    st.sampled_from(["[1, 2]", "{a = 1}", '"quoted"', "inf", "-inf", "nan", "1e400", "true", "0x10", "1_000",
                     "'''", "[[1]]", "1979-05-27", "", "=", "\\"]),
    st.text(string.printable, max_size=30))


@pytest.fixture(scope="session")
def config(tmp_path_factory, char_dataset) -> Path:
    return write_config(tmp_path_factory.mktemp("props") / "tiny.toml", char_dataset)


@EXAMPLES
@given(section=st.one_of(st.sampled_from(sorted(SECTIONS)), TEXT),
       key=st.one_of(st.sampled_from(sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__})),
                     TEXT),
       value=SETTING_VALUES)
def test_a_set_value_gives_a_config_or_one_sentence(config, section, key, value):
    item = f"{section}.{key}={value}"
    for load in (lambda: load_config(config, [item]), lambda: load_finetune_config(None, [item])):
        try:
            load()
        except UserError as err:
            message = str(err)
            assert message and "\n" not in message and len(message) < 2000, message
