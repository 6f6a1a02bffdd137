"""The OpenAPI document (/openapi.json) of `lmlab serve`: each POST route's request body as JSON Schema, written from
the tables the server checks bodies with (lmlab.serving.openai_api: the fields, their types and bounds) and from the
served run, and every status a route answers with. The server takes every body the schemas allow and refuses every
body they forbid (tests/test_serve_schema.py runs schemathesis with every check), but for what JSON Schema cannot
state, each a documented 400: a prompt, or the prompt a chat renders to, longer than the context in tokens; text a
char tokenizer cannot read once normalised; a conversation a chat template refuses."""

from __future__ import annotations

import math
from typing import Any

from lmlab.core.config import STOP_CHARS
from lmlab.serving.openai_api import (
    FIELDS,
    FLAG,
    HINTS,
    MAX_STOPS,
    NEUTRAL_MESSAGE_KEYS,
    ROLES,
    TEXT_PART_KEYS,
    UNSUPPORTED,
    Scalar,
    scalars,
)
from lmlab.serving.requests import Served
from lmlab.serving.routes import ROUTES

EVENT = {"anyOf": [{"type": "object"}, {"const": "[DONE]"}]}  # a streamed event's data: a chunk, then [DONE]
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
WHY = {400: "a field, a prompt or a chat the server cannot take (the message names it)", 401: "no API key, or "
       "another", 404: "a model this server does not serve", 408: "the body did not arrive in time (--body-timeout)",
       413: "the body is over --max-body-bytes", 429: "the batch, its queue or a lane of request parsing is full; "
       "retry after Retry-After", 503: "the model is loading, or the server is shutting down"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null: every field the server reads as "not given" when it is null."""
    return {"anyOf": [schema, {"type": "null"}]}


def published(rule: Scalar) -> dict[str, Any]:
    """A field of `openai_api.scalars` as JSON Schema: what `openai_api.field` checks it for, or null."""
    kind = {(bool,): "boolean", (int,): "integer", (int, float): "number"}[rule.kinds]
    bounds = {key: bound for key, bound in (("minimum", rule.low), ("maximum", rule.high))
              if math.isfinite(bound)}
    return nullable({"type": kind, **bounds})


def text(served: Served, most: int | None = None) -> dict[str, Any]:
    """A string the tokenizer reads, of at most `most` characters: of a char tokenizer that normalises nothing, the
    characters it knows (it refuses others); of any other, any text."""
    schema: dict[str, Any] = {"type": "string", **({} if most is None else {"maxLength": most})}
    if exact_chars(served):
        known = sorted(c for c in served.run.tokenizer.vocab if len(c) == 1)
        # \uXXXX escapes, so that none means anything in a character class; beyond the Basic Multilingual Plane the
        # character itself, as \uXXXX there names half of one.
        schema["pattern"] = "^[" + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in known) + "]*$"
    return schema


def exact_chars(served: Served) -> bool:
    """Whether a prompt's characters are its tokens, one each: a char tokenizer with no normalisation (which may
    drop or change characters before they are counted)."""
    tokenizer = served.run.tokenizer
    return tokenizer.kind.per_character and tokenizer.backend.normalizer is None


def sampling(served: Served, endpoint: str) -> dict[str, Any]:
    """The fields both endpoints take (openai_api.SAMPLING) as `openai_api.scalars` has them, and the hints and unused
    fields they accept."""
    stop = {"type": "string", "maxLength": STOP_CHARS}
    fields = {**{name: published(rule) for name, rule in
                 scalars(endpoint, served.options.max_tokens_cap, served.options.max_batch).items()},
              "stream_options": nullable({"type": "object", "additionalProperties": False,
                                          "properties": {"include_usage": published(FLAG)}}),
              "stop": nullable({"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOPS}]})}
    return {**fields, **{name: {} for name in HINTS},
            **{name: {"enum": list(values)} for name, values in UNSUPPORTED[endpoint].items()}}


def rules(chat: bool) -> list[dict[str, Any]]:
    """What one field asks of another, as the parser checks it."""
    def given(name: str, value: Any = None) -> dict[str, Any]:
        return {"required": [name], "properties": {name: {"not": {"type": "null"}} if value is None
                                                   else {"const": value}}}

    both = [{"if": given("stream_options"), "then": given("stream", True)}]
    if chat:
        return [*both, {"if": given("top_logprobs"), "then": given("logprobs", True)},
                {"not": {"allOf": [given("max_tokens"), given("max_completion_tokens")]}}]
    return [*both, {"not": {"allOf": [given("echo", True), given("stream", True)]}},
            {"if": given("max_tokens", 0), "then": given("echo", True)}]


def completions(served: Served, names: list[str]) -> dict[str, Any]:
    vocab, context = served.run.config.model.vocab_size, served.context
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}, "minItems": 1,
           "maxItems": context}
    # A prompt as text: of exact characters, at most those that fit the context beside the special tokens the tokenizer
    # adds (the server checks as much, exactly); of other tokenizers, whatever its length (the server counts its
    # tokens, which JSON Schema cannot: a prompt longer than the context is a 400 context_length_exceeded).
    most = context - len(served.run.tokenizer.encode("", True)) if exact_chars(served) else None
    one = {"anyOf": [text(served, most), ids]}
    prompts = {"type": "array", "minItems": 1, "maxItems": served.options.max_batch, "items": one}
    fields = {**sampling(served, "completions"), "prompt": {"anyOf": [one, prompts]}}
    # k prompts of n choices each are k * n rows of the batch.
    batch = [{"if": {"required": ["prompt"], "properties": {"prompt": {"type": "array", "minItems": k,
                                                                      "items": {"not": {"type": "integer"}}}}},
              "then": {"properties": {"n": published(Scalar((int,), 1, served.options.max_batch // k))}}}
             for k in range(2, served.options.max_batch + 1)]
    return body(fields, "completions", names, rules(False) + batch)


def chat(served: Served, names: list[str]) -> dict[str, Any]:
    fields = {**sampling(served, "chat"), "messages": messages(served)}
    return body(fields, "chat", names, rules(True), required=["messages"])


def messages(served: Served) -> dict[str, Any]:
    """A chat: messages of a role and text, or text parts, of any length and number (the server checks the prompt
    they render to, which JSON Schema cannot: one longer than the context is a 400 context_length_exceeded). A
    transcript renders every message as it is: its text is what the tokenizer reads."""
    run = served.run
    words = text(served) if run.chat_template is None and run.prompt_format is None else {"type": "string"}
    part = {"type": "object", "required": list(TEXT_PART_KEYS), "additionalProperties": False,
            "properties": {"type": {"const": "text"}, "text": words}}
    content = {"anyOf": [words, {"type": "array", "minItems": 1, "items": part}]}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"enum": list(ROLES)}, "name": {}, "content": content,
                              **{key: {"enum": [None, False, 0, "", [], {}]} for key in NEUTRAL_MESSAGE_KEYS}}}
    schema: dict[str, Any] = {"type": "array", "items": message, "minItems": 1}
    if served.run.chat_template is None and served.run.prompt_format is not None:
        schema["contains"] = {"properties": {"role": {"const": "user"}}}  # its instruction is a user's message
    return schema


def body(fields: dict[str, Any], endpoint: str, names: list[str],
         constraints: list[dict[str, Any]] | None = None, **more: Any) -> dict[str, Any]:
    """An object of `fields` (the endpoint's, its hints and its unused ones) and `model` (one of `names`, or null),
    nothing else, under `constraints` and what `more` says."""
    fields = {**fields, "model": {"enum": [None, *names]}}
    assert set(FIELDS[endpoint]) <= set(fields), set(FIELDS[endpoint]) - set(fields)
    return {"type": "object", "additionalProperties": False, "properties": fields,
            **({"allOf": constraints} if constraints else {}), **more}


def tokenize(served: Served, names: list[str]) -> dict[str, Any]:
    flag = published(FLAG)
    fields = {"prompt": text(served), "messages": messages(served), "add_special_tokens": flag,
              "return_token_strs": flag, "add_generation_prompt": {"enum": [True, None]},
              "continue_final_message": {"enum": [False, None]}}
    return body(fields, "tokenize", names, oneOf=[{"required": ["prompt"]}, {"required": ["messages"]}])


def detokenize(served: Served, names: list[str]) -> dict[str, Any]:
    ids = {"type": "integer", "minimum": 0, "maximum": served.run.tokenizer.vocab_size - 1}
    return body({"tokens": {"type": "array", "items": ids}}, "detokenize", names, required=["tokens"])


BODIES = {"/v1/completions": completions, "/v1/chat/completions": chat, "/tokenize": tokenize,
          "/detokenize": detokenize}


def describe(document: dict[str, Any], served: Served, names: list[str], keyed: bool) -> None:
    """Add the request bodies, the models' names and the statuses each route of `ROUTES` answers with to FastAPI's
    `document`."""
    document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        statuses = [*([401] if keyed and route.keyed else []), *([503] if route.loading else []),
                    *([400, 404, 408, 413, 429] if route.method == "POST" else []), *route.statuses]
        operation["responses"].pop("422", None)  # FastAPI's own validation error: these routes never give it
        for status in statuses:
            operation["responses"][str(status)] = {"description": WHY[status], "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if route.method == "POST":
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": BODIES[route.path](served, names)}}}
        if route.streamed:  # answered whole, or streamed
            operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": EVENT}
        for parameter in operation.get("parameters", []):  # {model_id}: a name this server answers to, else 404
            parameter["schema"] = {"type": "string", "enum": names}
    document["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}


def add_openapi(app: Any, state: Any) -> None:
    """Make FastAPI's /openapi.json describe the bodies and statuses (`describe`) once the run is loaded."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's, kept until its routes change: described again (the same) each time
        if state.served is not None:
            describe(document, state.served, state.names, state.api_key is not None)
        return document

    app.openapi = openapi
