"""The bodies `lmlab serve` reads, checked and tokenized: completions and chats (OpenAI's fields, through
lmlab.openai_api), and vLLM's /tokenize and /detokenize. The parsers do CPU work (JSON, the tokenizer): the
server runs them off its event loop."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from lmlab.batcher import Batcher
from lmlab.errors import UserError
from lmlab.openai_api import ApiError, chat_messages, check_fields, field, sampling, stream_fields


@dataclass
class Served:
    """The run behind the server once it is loaded, its batcher and its limits. Chats go through the run's
    prompt format if it was fine-tuned, else they are rendered as a plain transcript."""

    run: Any  # the LoadedRun (its module imports torch, which this one does not)
    batcher: Batcher
    max_tokens_cap: int
    max_batch: int
    max_body_bytes: int
    created: int  # when the served checkpoint was written (the model's `created`)
    max_prompt_chars: int | None  # the longest prompt that may fit the context; None when a token has no bound
    empty_prompt: list[int]  # what an empty prompt stands for: the start of a document

    @property
    def context(self) -> int:
        return self.run.config.model.block_size


@dataclass
class Request:
    """A validated completion request: the prompt's token ids, how to sample each choice, how to answer."""

    ids: list[int]
    params: list  # SamplingParams, one per choice
    stream: bool
    include_usage: bool
    chat: bool


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}).")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


def check_model(body: dict[str, Any], names: list[str]) -> None:
    if body.get("model") not in (None, *names):
        raise ApiError(404, f"model {body.get('model')!r} is not served here; use {names[0]!r}.", "model",
                       "model_not_found")


def chat_prompt(served: Served, messages: Any) -> tuple[str, tuple[str, ...]]:
    """Render chat messages: through the fine-tuning format (the last user message is the instruction, the
    format being single-turn), else as a `role: content` transcript ending with `assistant:`."""
    turns = chat_messages(messages)
    fmt = served.run.prompt_format
    if fmt is not None:
        users = [text for role, text in turns if role == "user"]
        if not users:
            raise ApiError(400, "`messages` needs a user message: it is the instruction.", "messages")
        return fmt.render(users[-1]), (fmt.end,)
    return "".join(f"{role}: {text}\n" for role, text in turns) + "assistant:", ("\nuser:",)


def encode_prompt(served: Served, prompt: str) -> list[int]:
    """The prompt's token ids, refused with context_length_exceeded when they cannot fit the context, before
    tokenizing when its length alone says so."""
    block, tokenizer = served.context, served.run.tokenizer
    too_long = f"this model's context is {block} tokens; shorten the prompt."
    if served.max_prompt_chars is not None and len(prompt) > served.max_prompt_chars:
        raise ApiError(400, f"the prompt is {len(prompt):,} characters, more than fits: {too_long}", "prompt",
                       "context_length_exceeded")
    ids = encode(served, prompt, "prompt") if prompt else served.empty_prompt
    if len(ids) > block:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and {too_long}", "prompt", "context_length_exceeded")
    return ids


def encode(served: Served, text: str, param: str, special: bool = True) -> list[int]:
    """`text`'s token ids (with the special tokens the tokenizer adds, e.g. a BOS, unless not `special`); a char
    tokenizer's unseen characters get a 400 naming `param`."""
    tokenizer = served.run.tokenizer
    try:
        tokenizer.check(text, f"`{param}`")
    except UserError as err:
        raise ApiError(400, str(err), param)
    return tokenizer.backend.encode(text, add_special_tokens=special).ids


def parse_request(served: Served, names: list[str], raw: bytes, chat: bool) -> Request:
    """A request body checked and its prompt tokenized (CPU work: run it off the event loop)."""
    body = json_object(raw)
    check_fields(body, "chat" if chat else "completions")
    check_model(body, names)
    if chat:
        prompt, stops = chat_prompt(served, body.get("messages"))
    else:
        prompt, stops = body.get("prompt", ""), ()
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "`prompt` must be a string (or a list of one string).", "prompt")
    stream, include_usage = stream_fields(body)
    params = sampling(body, served.max_tokens_cap, served.max_batch, stops, secrets.randbelow(2**63))
    return Request(encode_prompt(served, prompt), params, stream, include_usage, chat)


TOKENIZE = ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "continue_final_message",
            "return_token_strs")


def tokenize_request(served: Served, names: list[str], raw: bytes) -> dict[str, Any]:
    """vLLM's /tokenize: `prompt` (a string) or `messages` (a chat, rendered as /v1/chat/completions renders it)
    to {count, max_model_len, tokens, token_strs}. A text longer than the context is counted, not refused."""
    body = json_object(raw)
    unknown = [name for name in body if name not in TOKENIZE]
    if unknown:
        raise ApiError(400, f"unknown field `{unknown[0]}`; /tokenize takes {', '.join(TOKENIZE)}.", unknown[0],
                       "unknown_field")
    check_model(body, names)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "/tokenize takes `prompt` (a string) or `messages` (a chat), one of them.", "prompt")
    flags = {name: field(body, name, (bool,), default) for name, default in
             (("add_special_tokens", "prompt" in body), ("add_generation_prompt", True),
              ("continue_final_message", False), ("return_token_strs", False))}
    if not flags["add_generation_prompt"] or flags["continue_final_message"]:
        raise ApiError(400, "lmlab renders a chat ending in the assistant's turn: `add_generation_prompt` must be "
                       "true and `continue_final_message` false.", "add_generation_prompt", "unsupported")
    if "messages" in body:
        text, param = chat_prompt(served, body["messages"])[0], "messages"
    elif isinstance(body["prompt"], str):
        text, param = body["prompt"], "prompt"
    else:
        raise ApiError(400, f"`prompt` must be a string, got {type(body['prompt']).__name__}.", "prompt")
    ids = encode(served, text, param, flags["add_special_tokens"])
    strings = [served.run.tokenizer.backend.id_to_token(i) for i in ids] if flags["return_token_strs"] else None
    return {"count": len(ids), "max_model_len": served.context, "tokens": ids, "token_strs": strings}


def detokenize_request(served: Served, names: list[str], raw: bytes) -> dict[str, Any]:
    """vLLM's /detokenize: `tokens` (ids of this model's vocabulary) to {prompt: their text}."""
    body = json_object(raw)
    unknown = [name for name in body if name not in ("model", "tokens")]
    if unknown:
        raise ApiError(400, f"unknown field `{unknown[0]}`; /detokenize takes model and tokens.", unknown[0],
                       "unknown_field")
    check_model(body, names)
    tokens, vocab = body.get("tokens"), served.run.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
        raise ApiError(400, f"`tokens` must be a list of token ids from 0 to {vocab - 1}.", "tokens")
    return {"prompt": served.run.tokenizer.decode(tokens)}


async def read_body(http: Any, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes (from Content-Length, before
    reading any of it, else while reading), so a huge body never sits in memory."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes, this server's limit (--max-body-bytes); "
                         "send a shorter one.", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)
