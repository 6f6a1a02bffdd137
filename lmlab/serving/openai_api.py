"""The OpenAI request bodies `lmlab serve` takes, checked field by field, and the objects it answers with. An endpoint
takes the fields it implements (FIELDS) and those that only tag or route a request (HINTS); fields it cannot honour
(UNSUPPORTED) only with the value that means "not used"; anything else gets a 400 naming the field."""

from __future__ import annotations

import math
import reprlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from lmlab.core.config import MAX_COUNT, MAX_SEED, SamplingParams, seeded
from lmlab.core.errors import UserError

if TYPE_CHECKING:  # the server imports this module before torch, to answer while the model loads
    from lmlab.inference.scoring import TokenScore


_SHOWN = reprlib.Repr()  # short and shallow: a value of a megabyte or a thousand levels is quoted in a line
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlong = 2, 60, 60, 4, 4, 40


def shown(value: Any) -> str:
    """A request's value as an error message quotes it: short, however long or deeply nested it is."""
    return _SHOWN.repr(value)


def key_name(key: str) -> str:
    """A client's field name as an error names it: as sent, unless too long or not text a response can hold (a lone
    surrogate, which UTF-8 cannot encode)."""
    return key if len(key) <= 60 and not any("\ud800" <= c <= "\udfff" for c in key) else shown(key)


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Any:
        """The error as a JSON response: what a route answers, and an ASGI app that middleware sends."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), self.status, self.headers)


SAMPLING = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed")
FIELDS = {"completions": (*SAMPLING, "prompt", "logprobs", "echo"),
          "chat": (*SAMPLING, "messages", "max_completion_tokens", "logprobs", "top_logprobs"),
          "tokenize": ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                       "continue_final_message", "return_token_strs"),  # vLLM's, as the next
          "detokenize": ("model", "tokens")}
# Taken by OpenAI's endpoints (not vLLM's), and ignored.
HINTS = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
         "metadata", "service_tier")
# Each with the values that mean "not used".
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "completions": {"best_of": (None, 1), "suffix": (None, ""),
                    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})},
    "chat": {"presence_penalty": (None, 0),
             "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
             "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False), "functions": (None, []),
             "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
             "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
             "verbosity": (None,), "web_search_options": (None,), "store": (None, False), "moderation": (None,)},
}


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values are, for a value UNSUPPORTED lists: `false` is not `0`, nor `true` `1`, as Python's ==
    has them; 0 and 0.0 are one number. None of those values holds a number or a boolean inside, where == is JSON's
    equality already."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def check_fields(body: dict[str, Any], endpoint: str) -> None:
    """A 400 naming the first field this endpoint (of FIELDS) neither implements, ignores as a hint, nor leaves
    unused."""
    hints = HINTS if endpoint in UNSUPPORTED else ()
    for key, value in body.items():
        unsupported, name = UNSUPPORTED.get(endpoint, {}).get(key), key_name(key)
        if unsupported is not None and not any(json_equal(value, neutral) for neutral in unsupported):
            raise ApiError(400, f"`{name}` is not supported by lmlab serve; leave it out.", name, "unsupported")
        if unsupported is None and key not in FIELDS[endpoint] and key not in hints:
            known = ", ".join(FIELDS[endpoint])
            raise ApiError(400, f"unknown field `{name}`; this endpoint takes {known}.", name, "unknown_field")


@dataclass(frozen=True)
class Scalar:
    """What a field of one JSON scalar takes: its types (`int`: a whole number, 5.0 too; never a boolean) and a
    number's range. The server checks a body by it (`field`) and /openapi.json publishes it (lmlab.serving.schema)."""

    kinds: tuple[type[bool | int | float], ...]
    low: float = -math.inf
    high: float = math.inf


FLAG = Scalar((bool,))
MAX_STOPS = 4  # OpenAI's limit on the stop strings of a request
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # OpenAI's limits on the alternatives per token


def scalars(endpoint: str, cap: int, most_choices: int) -> dict[str, Scalar]:
    """The scalar fields of `endpoint` (completions or chat) and what each takes, on a server whose cap on new tokens
    is `cap` and that decodes `most_choices` choices at once. A completion's `max_tokens` may be 0 (with `echo`)."""
    common = {"max_tokens": Scalar((int,), 0 if endpoint == "completions" else 1, cap),
              "temperature": Scalar((int, float), 0, 2), "top_p": Scalar((int, float), 1e-6, 1),
              "top_k": Scalar((int,), 1, MAX_COUNT), "n": Scalar((int,), 1, most_choices),
              "seed": Scalar((int,), 0, MAX_SEED), "stream": FLAG}
    if endpoint == "chat":
        return {**common, "max_completion_tokens": Scalar((int,), 1, cap), "logprobs": FLAG,
                "top_logprobs": Scalar((int,), 0, MAX_LOGPROBS["chat"])}
    return {**common, "logprobs": Scalar((int,), 0, MAX_LOGPROBS["completions"]), "echo": FLAG}


def field(body: dict[str, Any], name: str, rule: Scalar, default: Any) -> Any:
    """A request field checked against its `rule`; a 400 naming it otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if rule.kinds == (int,) and whole(value):
        value = int(value)
    if isinstance(value, bool) and bool not in rule.kinds or not isinstance(value, rule.kinds):
        raise ApiError(400, f"`{name}` must be {' or '.join(k.__name__ for k in rule.kinds)}, got {shown(value)}.",
                       name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"`{name}` is {value}; it must be a finite number.", name)
    if not rule.low <= value <= rule.high:
        raise ApiError(400, f"`{name}` is {shown(value)}; it must be between {rule.low} and {rule.high}.",
                       name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"`stop` must be a string or a list of at most {MAX_STOPS} strings.", "stop")
    return tuple(stops)


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream`, and whether the stream ends with a usage chunk (`stream_options.include_usage`)."""
    stream = field(body, "stream", FLAG, False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "`stream_options` goes with `stream: true`.", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "`stream_options` takes only `include_usage` (true or false).", "stream_options")
    return stream, field(options, "include_usage", FLAG, False)


def sampling(body: dict[str, Any], rules: dict[str, Scalar], stop: tuple[str, ...], seed: int) -> list[SamplingParams]:
    """The SamplingParams of each of the `n` choices asked for (`rules`: `scalars` of the endpoint): choice i draws
    with seed + i (`seed` is the request's, else a random one)."""
    n = field(body, "n", rules["n"], 1)
    # `max_completion_tokens` (chat's current name) or `max_tokens`, one of them
    given = [v for name in ("max_completion_tokens", "max_tokens") if name in rules
             and (v := field(body, name, rules[name], None)) is not None]
    if len(given) > 1:
        raise ApiError(400, "`max_completion_tokens` and `max_tokens` are both given; give one of them.", "max_tokens")
    try:
        params = SamplingParams(given[0] if given else min(256, int(rules["max_tokens"].high)),
                                float(field(body, "temperature", rules["temperature"], 1.0)),
                                field(body, "top_k", rules["top_k"], None),
                                float(field(body, "top_p", rules["top_p"], 1.0)),
                                field(body, "seed", rules["seed"], seed), (*stop, *_stop(body)))
    except UserError as err:  # what no type check catches, such as a stop string too long
        raise ApiError(400, str(err), str(err).split(" ")[0])
    return seeded(params, n)


# -- log-probabilities and prompts as tokens: what evaluators (lm-evaluation-harness's local-completions) send --

def logprobs_fields(body: dict[str, Any], rules: dict[str, Scalar],
                    chat: bool) -> tuple[int | None, bool, bool]:
    """The alternatives to return per token (None: no log-probabilities), `echo`, and whether the request generates.
    Completions take `logprobs` 0-5 and `echo`; chat takes `logprobs: true` with `top_logprobs` 0-20. A completion's
    `max_tokens: 0` with `echo` only reads and scores the prompt; without `echo` it asks for nothing, which is
    refused."""
    if chat:
        wanted = field(body, "logprobs", rules["logprobs"], False)
        top = field(body, "top_logprobs", rules["top_logprobs"], None)
        if top is not None and not wanted:
            raise ApiError(400, "`top_logprobs` goes with `logprobs: true`.", "top_logprobs")
        return (top or 0) if wanted else None, False, True
    top = field(body, "logprobs", rules["logprobs"], None)
    echo = field(body, "echo", rules["echo"], False)
    if echo and body.get("stream"):
        raise ApiError(400, "`echo` cannot be streamed: the prompt's log-probabilities come whole; leave out `stream` "
                       "or `echo`.", "echo")
    generate = not whole(body.get("max_tokens")) or body["max_tokens"] != 0
    if not generate and not echo:
        raise ApiError(400, "`max_tokens` is 0, which generates nothing; pass `echo: true` to score the prompt alone, "
                       "or max_tokens of 1 or more.", "max_tokens")
    return top, echo, generate


def prompt_list(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completion request: a string, a list of token ids, or a list of either. Token ids must be whole
    numbers of the model's vocabulary."""
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = prompt
    else:
        odd = next((t for t in _flat(prompt) if not isinstance(t, str) and not whole(t)), None)
        why = f" ({odd!r} is not a token id: ids are whole numbers)" if isinstance(odd, (int, float)) else ""
        raise ApiError(400, f"`prompt` must be a string, a list of token ids, or a non-empty list of strings or of "
                       f"token-id lists{why}.", "prompt")
    for i, ids in enumerate(prompts):
        if isinstance(ids, list):
            if not ids:
                raise ApiError(400, f"`prompt` {i} is an empty list of token ids; give at least one.", "prompt")
            wrong = next((t for t in ids if not 0 <= t < vocab_size), None)
            if wrong is not None:
                raise ApiError(400, f"`prompt` {i} has token id {shown(wrong)}, outside this model's vocabulary (0 "
                               f"to {vocab_size - 1}).", "prompt")
    return [p if isinstance(p, str) else list(map(int, p)) for p in prompts]


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(map(whole, value))


def whole(value: Any) -> bool:
    """A whole number as JSON Schema's "integer" has it (5.0 is 5); not a boolean."""
    return type(value) is int or type(value) is float and value.is_integer()


def _flat(value: Any) -> list[Any]:
    return [v for item in value for v in (item if isinstance(item, list) else [item])] if isinstance(value, list) \
        else [value]


def _top(score: TokenScore, text: str, piece: Callable[[int], str]) -> dict[str, float] | None:
    """A token's likeliest alternatives by their text, likeliest first, and the token itself: OpenAI returns up to
    logprobs + 1 of them."""
    if score.logprob is None:
        return None
    top: dict[str, float] = {}
    for token, logprob in zip(score.top_ids, score.top_logprobs):
        top.setdefault(piece(token), logprob)
    top.setdefault(text, score.logprob)
    return top


def completion_logprobs(scores: list[TokenScore], piece: Callable[[int], str], start: int) -> dict[str, Any]:
    """OpenAI's `logprobs` object of a completion choice; text offsets count from `start` (the prompt's length, unless
    it is echoed)."""
    tokens = [piece(s.token) for s in scores]
    offsets = list(accumulate(map(len, tokens), initial=start))[:-1]  # where each token's text starts
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [_top(s, text, piece) for s, text in zip(scores, tokens)], "text_offset": offsets}


def chat_logprobs(scores: list[TokenScore], piece: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's `logprobs` object of a chat choice."""
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        text = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in zip(s.top_ids, s.top_logprobs)]}
                        for s in scores], "refusal": None}


def within_text(scores: list[TokenScore], piece: Callable[[int], str], length: int) -> list[TokenScore]:
    """The generated tokens whose text is in a completion of `length` characters: not those of a stop string or of the
    end-of-text token that ended it."""
    starts = accumulate((len(piece(s.token)) for s in scores), initial=0)  # where each token's text starts
    return [s for s, start in zip(scores, starts) if start < length]


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_KEYS = ("role", "content", "name")
NEUTRAL_MESSAGE_KEYS = ("refusal", "tool_calls", "function_call", "audio", "annotations")  # echoed back as null
TEXT_PART_KEYS = ("type", "text")


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
            raise ApiError(400, f"content part type {shown(kind)} in `{where}` is not supported: this model reads text "
                           "only; send {\"type\": \"text\", \"text\": ...} parts.", "messages", "unsupported")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"a text part in `{where}` has no `text` string.", "messages")
        extra = next((key for key in part if key not in TEXT_PART_KEYS), None)
        if extra is not None:
            raise ApiError(400, f"`{key_name(extra)}` in a text part of `{where}` is not supported by lmlab serve; a "
                           "text part holds `type` and `text`.", "messages", "unsupported")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(messages: Any) -> list[tuple[str, str]]:
    """(role, text) of each message; `developer` is OpenAI's newer name for `system`."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"`{where}.role` is {shown(role)}; use one of {', '.join(ROLES)}.", "messages")
        for key, value in m.items():
            if key not in MESSAGE_KEYS and not (key in NEUTRAL_MESSAGE_KEYS and not value):
                raise ApiError(400, f"`{where}.{key_name(key)}` is not supported by lmlab serve; leave it out.",
                               "messages", "unsupported")
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


def response(top: dict[str, Any], chat: bool, texts: list[str], reasons: list[str | None], tokens: dict[str, int],
             logprobs: Sequence[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(texts)
    choices = [{"index": i, **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
                "logprobs": lp, "finish_reason": r} for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
    return {**top, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": tokens}


def chunk(top: dict[str, Any], chat: bool, index: int, piece: str | None, finish: str | None,
          role: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk: a choice's text piece, its finish reason, or (chat) the assistant role first."""
    delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
    text = {"delta": delta} if chat else {"text": piece or ""}
    return {**top, "object": "chat.completion.chunk" if chat else "text_completion",
            "choices": [{"index": index, **text, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(top: dict[str, Any], chat: bool, tokens: dict[str, int]) -> dict[str, Any]:
    return {**top, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [], "usage": tokens}
