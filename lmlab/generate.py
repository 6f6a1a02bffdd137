"""Sampling, carrying what the model keeps between tokens: a transformer's KV cache or a recurrent state."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import torch

from lmlab.config import SamplingParams
from lmlab.data.tokenizers import Tokenizer
from lmlab.device import autocast
from lmlab.errors import UserError
from lmlab.model import LanguageModel
from lmlab.prompt import alpaca_format
from lmlab.rundir import LoadedRun


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """(vocab,) logits scaled by the temperature, with the tokens top_k and top_p rule out set to -inf."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus: keep the likeliest tokens until their probabilities reach top_p (the first always stays).
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream_ids(model: LanguageModel, prompt: list[int], params: SamplingParams,
               dtype: torch.dtype = torch.float32) -> Iterator[int]:
    """Yield up to `params.max_new_tokens` tokens continuing `prompt`, one at a time.

    The model was trained on block_size tokens at most, so when the cache is full the window restarts from the
    newest half of the context (re-encoded in one pass) rather than recomputing the whole window every token.
    """
    device = next(model.parameters()).device
    block_size = model.config.block_size
    generator = torch.Generator(device=device).manual_seed(params.seed)
    ids, cache = list(prompt), None
    for _ in range(params.max_new_tokens):
        if cache is None or cache.pos == block_size:
            window = ids[-block_size:] if cache is None else ids[-max(1, block_size // 2):]
            cache = model.new_cache(1, device, dtype)
            step_input = window
        else:
            step_input = ids[-1:]
        with autocast(device, dtype):
            logits, _ = model(torch.tensor([step_input], device=device), cache=cache)
        ids.append(_pick(logits[0, -1], params, generator))
        yield ids[-1]


def held_back(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of `text` not to send yet: an unfinished UTF-8 sequence (decoded as U+FFFD) or
    the beginning of a stop string, which the next tokens may complete."""
    unfinished = len(text) - len(text.rstrip("\ufffd"))
    partial = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(unfinished, partial)


class TextStream:
    """Iterating yields the decoded text of a continuation piece by piece, ending before the first stop
    string, at the end-of-text token or after max_new_tokens; then `finish_reason` is "stop" or "length"
    (OpenAI's words) and `tokens` the number of tokens generated."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 dtype: torch.dtype = torch.float32):
        self.tokenizer, self.stop = tokenizer, [s for s in params.stop if s]
        self.ids = stream_ids(model, prompt, params, dtype)
        self.finish_reason, self.tokens = "length", 0

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        text, sent = "", 0  # sent: characters of text already yielded
        for token in self.ids:
            self.tokens += 1
            if token == self.tokenizer.eot_id:
                self.finish_reason = "stop"
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            cuts = [i for i in (text.find(s, max(0, sent - len(s))) for s in self.stop) if i >= 0]
            if cuts:
                self.finish_reason, text = "stop", text[:min(cuts)]
                break
            ready = len(text) - held_back(text, self.stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        if len(text) > sent:
            yield text[sent:]

    def text(self) -> str:
        return "".join(self)


def document_start(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt stands for: the start of a document, after an end-of-text token (or, for char
    tokenizers, which have none, a newline)."""
    return [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")


def sample_stream(run: LoadedRun, prompt: str, params: SamplingParams) -> Iterator[str]:
    """The prompt, then its continuation piece by piece as it is generated (an empty prompt starts a new document),
    in the run's own tokenizer, up to the end-of-text token or max_new_tokens; the prompt is checked at once."""
    tokenizer = run.tokenizer
    tokenizer.check(prompt, "--prompt")
    start = tokenizer.encode(prompt) if prompt else document_start(tokenizer)
    return itertools.chain([prompt], TextStream(run.model, tokenizer, start, params, run.dtype))


def sample(run: LoadedRun, prompt: str, params: SamplingParams) -> str:
    """The prompt and its continuation, as `sample_stream` yields them."""
    return "".join(sample_stream(run, prompt, params))


def instruct_stream(run: LoadedRun, instruction: str, input: str, params: SamplingParams) -> TextStream:
    """The model's answer to an instruction asked in the run's prompt format (Alpaca's for a run not fine-tuned),
    up to the format's end marker, piece by piece. With a char tokenizer, characters it never saw are blamed on
    the instruction or input that has them, or else on the prompt format (a run not tuned for instructions)."""
    fmt = run.prompt_format or alpaca_format(run.tokenizer)
    run.tokenizer.check(instruction, "the instruction")
    run.tokenizer.check(input, "the input")
    prompt = fmt.render(instruction, input)
    unseen = run.tokenizer.unseen(prompt)
    if unseen:
        raise UserError(f"the {fmt.name} prompt format uses characters that {run.run.path}'s char tokenizer never saw "
                        f"({unseen!r}), so this run cannot be asked instructions; sample it with --prompt, or "
                        "fine-tune it with `lmlab finetune` first.")
    ids = run.tokenizer.encode(prompt)[-run.config.model.block_size:]
    params = dataclasses.replace(params, stop=(*params.stop, fmt.end))
    return TextStream(run.model, run.tokenizer, ids, params, run.dtype)


def instruct(run: LoadedRun, instruction: str, input: str, params: SamplingParams) -> str:
    """The whole answer `instruct_stream` gives."""
    return instruct_stream(run, instruction, input, params).text()
