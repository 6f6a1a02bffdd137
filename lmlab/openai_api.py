"""The OpenAI request bodies `lmlab serve` takes, checked field by field, and the objects it answers with.

One rule for fields: an endpoint takes the fields it implements (FIELDS); OpenAI fields that only tag or route a
request (HINTS: `user`, cache keys) are accepted and change nothing; OpenAI fields it cannot honour (UNSUPPORTED)
are accepted only with the value that means "not used"; anything else gets a 400 naming the field, as a request
the server would silently half-answer must not get a 200.
"""

from __future__ import annotations

import math
import time
from typing import Any

from lmlab.config import SamplingParams, seeded
from lmlab.errors import UserError


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


SAMPLING = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed")
FIELDS = {"completions": (*SAMPLING, "prompt"), "chat": (*SAMPLING, "messages", "max_completion_tokens")}
HINTS = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
         "metadata", "service_tier")
# Each with the values that mean "not used".
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "completions": {"logprobs": (None,), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})},
    "chat": {"logprobs": (None, False), "top_logprobs": (None,), "presence_penalty": (None, 0),
             "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
             "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False), "functions": (None, []),
             "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
             "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
             "verbosity": (None,), "web_search_options": (None,), "store": (None, False), "moderation": (None,)},
}


def check_fields(body: dict[str, Any], endpoint: str) -> None:
    """A 400 naming the first field this endpoint neither implements, ignores as a hint, nor leaves unused."""
    for name, value in body.items():
        unsupported = UNSUPPORTED[endpoint].get(name)
        if unsupported is not None and value not in unsupported:
            raise ApiError(400, f"`{name}` is not supported by lmlab serve; leave it out.", name, "unsupported")
        if unsupported is None and name not in FIELDS[endpoint] and name not in HINTS:
            known = ", ".join(FIELDS[endpoint])
            raise ApiError(400, f"unknown field `{name}`; this endpoint takes {known}.", name, "unknown_field")


def field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, low: float | None = None,
          high: float | None = None) -> Any:
    """A request field checked for type and range; a 400 naming it otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"`{name}` must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}.", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"`{name}` is {value}; it must be a finite number.", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"`{name}` is {value}; it must be between {low} and {high}.", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "`stop` must be a string or a list of at most 4 strings.", "stop")
    return tuple(stops)


def max_new_tokens(body: dict[str, Any], cap: int) -> int:
    """`max_completion_tokens` (chat's current name) or `max_tokens`; both given must agree."""
    given = {name: field(body, name, (int,), None, 1, cap) for name in ("max_completion_tokens", "max_tokens")}
    values = {v for v in given.values() if v is not None}
    if len(values) > 1:
        raise ApiError(400, "`max_completion_tokens` and `max_tokens` differ; give one of them.", "max_tokens")
    return values.pop() if values else min(256, cap)


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream`, and whether the stream ends with a usage chunk (`stream_options.include_usage`)."""
    stream = field(body, "stream", (bool,), False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "`stream_options` goes with `stream: true`.", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "`stream_options` takes only `include_usage` (true or false).", "stream_options")
    return stream, field(options, "include_usage", (bool,), False)


def sampling(body: dict[str, Any], cap: int, most_choices: int, stop: tuple[str, ...], seed: int) -> list[SamplingParams]:
    """The SamplingParams of each of the `n` choices asked for: choice i draws with seed + i (`seed` is the
    request's, else a random one)."""
    n = field(body, "n", (int,), 1, 1, most_choices)
    try:
        params = SamplingParams(max_new_tokens(body, cap), float(field(body, "temperature", (int, float), 1.0, 0, 2)),
                                field(body, "top_k", (int,), None, 1),
                                float(field(body, "top_p", (int, float), 1.0, 1e-6, 1)),
                                field(body, "seed", (int,), seed), (*stop, *_stop(body)))
    except UserError as err:  # what no type check catches, such as a seed beyond 63 bits
        raise ApiError(400, str(err), str(err).split(" ")[0])
    return seeded(params, n)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_KEYS = ("role", "content", "name")
NEUTRAL_MESSAGE_KEYS = ("refusal", "tool_calls", "function_call", "audio", "annotations")  # echoed back as null


def content_text(content: Any, where: str) -> str:
    """A message's text: a string, or text parts joined by newlines (OpenAI's content parts; no other kind)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"`{where}.content` must be text or a list of content parts.", "messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ApiError(400, f"content part type {kind!r} in `{where}` is not supported: this model reads text "
                           "only; send {\"type\": \"text\", \"text\": ...} parts.", "messages", "unsupported")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"a text part in `{where}` has no `text` string.", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(messages: Any) -> list[tuple[str, str]]:
    """(role, text) of each message; `developer` is OpenAI's newer name for `system`."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"`{where}.role` is {role!r}; use one of {', '.join(ROLES)}.", "messages")
        for key, value in m.items():
            if key not in MESSAGE_KEYS and not (key in NEUTRAL_MESSAGE_KEYS and not value):
                raise ApiError(400, f"`{where}.{key}` is not supported by lmlab serve; leave it out.", "messages",
                               "unsupported")
        out.append((ROLES[m["role"]], content_text(m.get("content"), where)))
    return out


def model_object(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    """A model as /v1/models lists it, with vLLM's `max_model_len` (the context, in tokens)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lmlab", "max_model_len": max_model_len}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def head(chat: bool, model: str, request_id: str) -> dict[str, Any]:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "created": int(time.time()), "model": model}


def response(top: dict[str, Any], chat: bool, texts: list[str], reasons: list[str], tokens: dict[str, int]) -> dict[str, Any]:
    """The whole answer to a request that did not stream."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**top, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": tokens}


def chunk(top: dict[str, Any], chat: bool, index: int, piece: str | None, finish: str | None,
          role: bool = False) -> dict[str, Any]:
    """One streamed chunk: a choice's text piece, its finish reason, or (chat) the assistant role first."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
        return {**top, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return {**top, "object": "text_completion",
            "choices": [{"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}]}


def usage_chunk(top: dict[str, Any], chat: bool, tokens: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream asked to include usage: no choices, the request's token counts."""
    return {**top, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [], "usage": tokens}
