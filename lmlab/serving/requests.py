"""The bodies `lmlab serve` reads, checked and tokenized: completions and chats, and vLLM's /tokenize and /detokenize.
The server runs the parsers off its event loop in stages: `read_request` (JSON, field names, a chat's turns; for
/tokenize, `read_tokenize`), `render_chat` (the template, in a lane of its own), then `parse_request` or
`tokenize_request`."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmlab.core.errors import UserError
from lmlab.serving.batcher import Batcher
from lmlab.serving.edge import ServeOptions
from lmlab.serving.openai_api import (
    FLAG,
    ApiError,
    chat_messages,
    check_fields,
    logprobs_fields,
    prompt_list,
    sampling,
    scalars,
    shown,
    stream_fields,
    whole,
)
from lmlab.serving.openai_api import field as body_field

if TYPE_CHECKING:  # lmlab.inference.generate imports torch, which the server imports only once the port is open
    from lmlab.inference.generate import ChatPrompt


@dataclass
class Served:
    """The run behind the server once it is loaded, its batcher and its limits."""

    run: Any  # the LoadedRun (its module imports torch, which this one does not)
    batcher: Batcher
    options: ServeOptions  # what it was asked to serve: its limits (--max-tokens-cap, --max-batch, --max-body-bytes)
    created: int  # when the served checkpoint was written (the model's `created`)
    max_prompt_chars: int | None  # the longest prompt that may fit the context; None when a token has no bound
    empty_prompt: list[int]  # what an empty prompt stands for: the start of a document

    @property
    def context(self) -> int:
        return self.run.config.model.block_size


@dataclass
class Request:
    """A validated completion request: its prompts' token ids (a completion may send several, each with its own `n`
    choices: choice i continues prompt i // n), how to sample each choice, how to answer."""

    prompts: list[list[int]]
    params: list  # SamplingParams, one per choice
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    texts: list[str] = field(default_factory=list)  # each prompt as text (echoed with `echo`)
    logprobs: int | None = None  # alternatives per token, when log-probabilities are asked for
    echo: bool = False
    generate: bool = True  # False: `max_tokens: 0` with `echo`, the prompts scored only

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return len(self.params) // len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def check_model(model: Any, names: list[str]) -> None:
    """A 404 unless `model` (a body's, or a route's {model_id}) is one of `names`, or not given."""
    if model not in (None, *names):
        raise ApiError(404, f"model {shown(model)} is not served here; use {names[0]!r}.", "model",
                       "model_not_found")


@dataclass
class Body:
    """A body read, its field names and model checked; a chat's messages as (role, text) turns, to be rendered."""

    fields: dict[str, Any]
    turns: list[tuple[str, str]] | None = None


def read_request(names: list[str], raw: bytes, endpoint: str) -> Body:
    """A body of `endpoint` (of openai_api.FIELDS): a JSON object of the fields it takes, for a model served here; a
    chat's messages as turns."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}).")
    except ValueError:  # Python's limit on the digits of an integer it reads
        raise ApiError(400, "the request body holds a number of more than 4,300 digits; no field takes one.")
    except RecursionError:
        raise ApiError(400, "the request body nests JSON arrays or objects too deeply; no field of this API nests "
                       "more than a few levels.")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    check_fields(body, endpoint)
    check_model(body.get("model"), names)
    return Body(body, chat_messages(body.get("messages")) if endpoint == "chat" else None)


def render_chat(served: Served, turns: list[tuple[str, str]]) -> ChatPrompt:
    """A chat's turns as the run's prompt (`generate.chat_prompt`: its chat template, multi-turn; its fine-tuning
    format; or a transcript); turns the template refuses, or fails on, get a 400 with its one sentence."""
    from lmlab.inference.generate import chat_prompt
    from lmlab.run.chat import Unrendered

    try:
        return chat_prompt(served.run, turns)
    except Unrendered as err:  # the server's own failure, not the request's
        raise ApiError(500, str(err), kind="server_error")
    except UserError as err:
        raise ApiError(400, str(err), "messages")


def encode_prompt(served: Served, prompt: str, param: str = "prompt", special: bool = True) -> list[int]:
    """The prompt's token ids, refused with context_length_exceeded when they cannot fit the context, before
    tokenizing when its length alone says so; `param` is the field it came from."""
    limit = served.max_prompt_chars
    # Counted as the tokenizer sees it: a dataset prepared with --keep-chars drops characters from every prompt.
    if limit is not None and len(prompt) > limit and len(served.run.tokenizer.normalize(prompt)) > limit:
        raise ApiError(400, f"the prompt is {len(prompt):,} characters, more than fits: this model's context is "
                       f"{served.context} tokens; shorten the prompt.", "prompt", "context_length_exceeded")
    return fitting(served, encode(served, prompt, param, special) if prompt else served.empty_prompt)


def encode(served: Served, text: str, param: str, special: bool = True) -> list[int]:
    """`text`'s token ids (with the special tokens the tokenizer adds, e.g. a BOS, unless not `special`); text the
    tokenizer cannot take (a char tokenizer's unseen characters, a lone surrogate) gets a 400 naming `param`."""
    tokenizer = served.run.tokenizer
    try:
        tokenizer.check(text, "the prompt" if param == "prompt" else "the chat's rendered prompt")
    except UserError as err:
        raise ApiError(400, str(err), param)
    return tokenizer.encode(text, special)


def fitting(served: Served, ids: list[int]) -> list[int]:
    """A prompt's token ids, refused with context_length_exceeded when it is longer than the context."""
    if len(ids) > served.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and this model's context is {served.context} tokens; "
                       "shorten the prompt.", "prompt", "context_length_exceeded")
    return ids


def parse_request(served: Served, body: Body, rendered: ChatPrompt | None = None) -> Request:
    """A completion or chat body read by `read_request` checked and its prompts tokenized; a chat's as `render_chat`
    rendered it."""
    chat, fields, special = body.turns is not None, body.fields, True
    if chat:
        assert rendered is not None, "a chat is parsed as render_chat rendered it"
        prompts: list[str | list[int]] = [rendered.text]
        stops, special = rendered.stop, rendered.special
    else:
        prompts, stops = prompt_list(fields.get("prompt", ""), served.run.config.model.vocab_size), ()
    rules = scalars("chat" if chat else "completions", served.options.max_tokens_cap, served.options.max_batch)
    logprobs, echo, generate = logprobs_fields(fields, rules, chat)
    stream, include_usage = stream_fields(fields)
    params = sampling(fields if generate else {**fields, "max_tokens": None}, rules, stops, secrets.randbelow(2**63))
    if len(prompts) * len(params) > served.options.max_batch:
        raise ApiError(400, f"{len(prompts)} prompts × n = {len(params)} are {len(prompts) * len(params)} choices, "
                       f"more than this server decodes at once (--max-batch {served.options.max_batch}); send at most "
                       f"{served.options.max_batch // len(params)} prompts per request.", "prompt")
    param = "messages" if chat else "prompt"
    ids = [encode_prompt(served, p, param, special) if isinstance(p, str) else fitting(served, p) for p in prompts]
    # An empty prompt echoes as empty text: the start of a document it stands for is not the client's.
    texts = [p if isinstance(p, str) else served.run.tokenizer.decode(i) for p, i in zip(prompts, ids)]
    return Request(ids, [p for _ in prompts for p in params], stream, include_usage, chat, texts, logprobs, echo,
                   generate)


def read_tokenize(names: list[str], raw: bytes) -> Body:
    """vLLM's /tokenize body: `prompt` (a string) or `messages` (a chat, rendered as /v1/chat/completions renders
    it), and its flags."""
    body = read_request(names, raw, "tokenize").fields
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "/tokenize takes `prompt` (a string) or `messages` (a chat), one of them.", "prompt")
    flags = {name: body_field(body, name, FLAG, default) for name, default in
             (("add_special_tokens", "prompt" in body), ("add_generation_prompt", True),
              ("continue_final_message", False), ("return_token_strs", False))}
    if not flags["add_generation_prompt"] or flags["continue_final_message"]:
        raise ApiError(400, "lmlab renders a chat ending in the assistant's turn: `add_generation_prompt` must be "
                       "true and `continue_final_message` false.", "add_generation_prompt", "unsupported")
    if "prompt" in body and not isinstance(body["prompt"], str):
        raise ApiError(400, f"`prompt` must be a string, got {type(body['prompt']).__name__}.", "prompt")
    turns = chat_messages(body["messages"]) if "messages" in body else None  # once it is known to be the one given
    return Body({"prompt": body.get("prompt"), **flags}, turns)


def tokenize_request(served: Served, body: Body, rendered: ChatPrompt | None = None) -> bytes:
    """/tokenize's answer, {count, max_model_len, tokens, token_strs}, as JSON (made here, off the event loop: a
    megabyte of text is a list of a million ids). A text longer than the context is counted, not refused."""
    fields = body.fields
    text, param = (rendered.text, "messages") if rendered is not None else (fields["prompt"], "prompt")
    ids = encode(served, text, param, fields["add_special_tokens"])
    strings = [served.run.tokenizer.backend.id_to_token(i) for i in ids] if fields["return_token_strs"] else None
    return json.dumps({"count": len(ids), "max_model_len": served.context, "tokens": ids,
                       "token_strs": strings}).encode()


def detokenize_request(served: Served, body: Body, rendered: None = None) -> dict[str, Any]:
    """vLLM's /detokenize: `tokens` (ids of this model's vocabulary) to {prompt: their text}; nothing is rendered."""
    tokens, vocab = body.fields.get("tokens"), served.run.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(whole(t) and 0 <= t < vocab for t in tokens):
        raise ApiError(400, f"`tokens` must be a list of token ids from 0 to {vocab - 1}.", "tokens")
    return {"prompt": served.run.tokenizer.decode(list(map(int, tokens)))}
