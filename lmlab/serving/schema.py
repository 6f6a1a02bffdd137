"""The OpenAPI document (/openapi.json) of `lmlab serve`: each POST route's request body as JSON Schema, written from
the field tables of lmlab.serving.openai_api and the served run, and every status a route answers with. A body the
schemas accept is one the server accepts (tests/test_serve_schema.py runs schemathesis on it); they are stricter where
JSON Schema cannot say what the server checks (a prompt's length whatever it tokenizes to)."""

from __future__ import annotations

from typing import Any

from lmlab.core.config import MAX_COUNT, MAX_SEED, STOP_CHARS
from lmlab.core.errors import UserError
from lmlab.serving.openai_api import FIELDS, HINTS, MAX_LOGPROBS, NEUTRAL_MESSAGE_KEYS, ROLES, UNSUPPORTED
from lmlab.serving.requests import TOKENIZE, Served
from lmlab.serving.routes import ROUTES

EVENT = {"anyOf": [{"type": "object"}, {"const": "[DONE]"}]}  # a streamed event's data: a chunk, then [DONE]
MESSAGES = 64  # the most messages a described chat holds
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


def integer(low: int, high: int) -> dict[str, Any]:
    return nullable({"type": "integer", "minimum": low, "maximum": high})


def text(served: Served, most: int) -> dict[str, Any]:
    """A string of at most `most` characters, of those the tokenizer knows (a char tokenizer refuses others)."""
    schema: dict[str, Any] = {"type": "string", "maxLength": most}
    tokenizer = served.run.tokenizer
    if tokenizer.kind.per_character:
        schema["pattern"] = "^[" + "".join(f"\\u{ord(c):04x}" for c in sorted(tokenizer.vocab) if len(c) == 1
                                           and ord(c) < 0x10000) + "]*$"
    return schema


def chars_sure_to_fit(served: Served, tokens: int) -> int:
    """The characters that take at most `tokens` tokens whatever they are, beside the special tokens the tokenizer adds
    to any text."""
    tokenizer = served.run.tokenizer
    return tokenizer.fewest_chars(tokens - len(tokenizer.encode("", True)))


def sampling(served: Served, chat: bool) -> dict[str, Any]:
    """The fields both endpoints take (openai_api.SAMPLING), and the hints and unused fields they accept."""
    stop = {"type": "string", "maxLength": STOP_CHARS}
    fields = {"max_tokens": integer(1 if chat else 0, served.max_tokens_cap),
              "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
              "top_p": nullable({"type": "number", "minimum": 1e-6, "maximum": 1}),
              "top_k": integer(1, MAX_COUNT), "n": integer(1, served.max_batch), "seed": integer(0, MAX_SEED),
              "stream": nullable({"type": "boolean"}),
              "stream_options": nullable({"type": "object", "additionalProperties": False,
                                          "properties": {"include_usage": nullable({"type": "boolean"})}}),
              "stop": nullable({"anyOf": [stop, {"type": "array", "items": stop, "maxItems": 4}]})}
    endpoint = "chat" if chat else "completions"
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
                {"not": {"required": ["max_tokens", "max_completion_tokens"]}}]
    return [*both, {"not": {"allOf": [given("echo", True), given("stream", True)]}},
            {"if": given("max_tokens", 0), "then": given("echo", True)}]


def completions(served: Served, names: list[str]) -> dict[str, Any]:
    vocab, context = served.run.config.model.vocab_size, served.context
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}, "minItems": 1,
           "maxItems": context}
    one = {"anyOf": [text(served, chars_sure_to_fit(served, context)), ids]}
    prompts = {"type": "array", "minItems": 1, "maxItems": served.max_batch, "items": one}
    fields = {**sampling(served, False), "model": {"enum": [None, *names]},
              "prompt": {"anyOf": [one, prompts]}, "logprobs": integer(0, MAX_LOGPROBS["completions"]),
              "echo": nullable({"type": "boolean"})}
    # k prompts of n choices each are k * n rows of the batch.
    batch = [{"if": {"required": ["prompt"], "properties": {"prompt": {"type": "array", "minItems": k,
                                                                      "items": {"not": {"type": "integer"}}}}},
              "then": {"properties": {"n": integer(1, served.max_batch // k)}}} for k in range(2, served.max_batch + 1)]
    return body(fields, FIELDS["completions"], rules(False) + batch)


def chat(served: Served, names: list[str]) -> dict[str, Any]:
    fields = {**sampling(served, True), "model": {"enum": [None, *names]}, "messages": messages(served),
              "max_completion_tokens": integer(1, served.max_tokens_cap), "logprobs": nullable({"type": "boolean"}),
              "top_logprobs": integer(0, MAX_LOGPROBS["chat"])}
    schema = body(fields, FIELDS["chat"], rules(True))
    schema["required"] = ["messages"]
    return schema


def messages(served: Served) -> dict[str, Any]:
    """A chat of up to as many messages as fit the context with some text each: one shape per count of `counts`, its
    text bounded so that that many fit together."""
    shapes = []
    for count in counts(served):
        content = text(served, max(0, chars_each(served, count)))
        message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
                   "properties": {"role": {"enum": list(ROLES)}, "name": {}, "content": {"anyOf": [content, {
                       "type": "array", "minItems": 1, "maxItems": 1, "items": {
                           "type": "object", "required": ["type", "text"], "additionalProperties": False,
                           "properties": {"type": {"const": "text"}, "text": content}}}]},
                       **{key: {"enum": [None, False, 0, "", [], {}]} for key in NEUTRAL_MESSAGE_KEYS}}}
        shapes.append({"type": "array", "items": message, "minItems": 1, "maxItems": count})
    schema: dict[str, Any] = shapes[0] if len(shapes) == 1 else {"type": "array", "anyOf": shapes}
    if served.run.chat_template is None and served.run.prompt_format is not None:
        schema["contains"] = {"properties": {"role": {"const": "user"}}}  # its instruction is a user's message
    return schema


def counts(served: Served) -> list[int]:
    """The message counts a chat is described at: 1, 2, 4, ... below the most messages that fit the context (at most
    MESSAGES), and that most."""
    fit, past = 1, 2
    while past <= MESSAGES and chars_each(served, past) >= 0:
        fit, past = past, 2 * past
    past = min(past, MESSAGES + 1)
    while past - fit > 1:
        middle = (fit + past) // 2
        fit, past = (middle, past) if chars_each(served, middle) >= 0 else (fit, middle)
    return sorted({*(2 ** i for i in range(fit.bit_length()) if 2 ** i < fit), fit})


def chars_each(served: Served, count: int) -> int:
    """The characters each of `count` messages may hold for all of them to fit the context, whatever their roles; -1
    where even empty ones do not fit."""
    from lmlab.inference.generate import chat_prompt

    frames = []
    for role in ("system", "user", "assistant", None):  # None: a user and an assistant in turn, a user's last
        turns = [(role or ("user", "assistant")[(count - 1 - i) % 2], "") for i in range(count)]
        try:
            frames.append(len(chat_prompt(served.run, turns).ids(served.run.tokenizer)))
        except UserError:  # roles the format or the template refuses (a 400 in its words)
            pass
    room = served.context - max(frames, default=served.context + 1)
    return -1 if room < 0 else served.run.tokenizer.fewest_chars(room) // count  # -1: not even empty ones fit


def body(fields: dict[str, Any], taken: tuple[str, ...], constraints: list[dict[str, Any]]) -> dict[str, Any]:
    """An object of `fields` (the endpoint's, its hints and its unused ones), nothing else, under `constraints`."""
    assert set(taken) <= set(fields), set(taken) - set(fields)
    return {"type": "object", "additionalProperties": False, "properties": fields,
            **({"allOf": constraints} if constraints else {})}


def tokenize(served: Served, names: list[str]) -> dict[str, Any]:
    flag = nullable({"type": "boolean"})
    fields = {"model": {"enum": [None, *names]}, "prompt": text(served, served.max_body_bytes // 16),
              "messages": messages(served), "add_special_tokens": flag, "return_token_strs": flag,
              "add_generation_prompt": {"enum": [True, None]}, "continue_final_message": {"enum": [False, None]}}
    schema = body(fields, TOKENIZE, [])
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]
    return schema


def detokenize(served: Served, names: list[str]) -> dict[str, Any]:
    vocab = served.run.tokenizer.vocab_size
    return {"type": "object", "additionalProperties": False, "required": ["tokens"],
            "properties": {"model": {"enum": [None, *names]},
                           "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                 "maximum": vocab - 1}}}}


BODIES = {"/v1/completions": completions, "/v1/chat/completions": chat, "/tokenize": tokenize,
          "/detokenize": detokenize}


def describe(document: dict[str, Any], served: Served, names: list[str], keyed: bool) -> None:
    """Add the request bodies and the statuses each route of `ROUTES` answers with to FastAPI's `document`."""
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
    document["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}


def add_openapi(app: Any, state: Any) -> None:
    """Make FastAPI's /openapi.json describe the bodies and statuses (`describe`) once the run is loaded."""
    generate, described = app.openapi, {}

    def openapi() -> dict[str, Any]:
        document = generate()  # FastAPI's, kept until its routes change
        if state.served is not None and described.get("document") is not document:
            describe(document, state.served, state.names, state.api_key is not None)
            described["document"] = document
        return document

    app.openapi = openapi
