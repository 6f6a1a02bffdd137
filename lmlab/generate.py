"""Sampling, carrying what the model keeps between tokens: a transformer's KV cache or a recurrent state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lmlab.data.tokenizers import Tokenizer
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.finetune import PromptFormat, prompt_format
from lmlab.model import LanguageModel
from lmlab.runs import load_run_model, load_run_tokenizer


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
          generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
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
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream_ids(model: LanguageModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
               top_k: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
               top_p: float = 1.0) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens continuing `prompt`, one at a time; temperature 0 is greedy.

    The model was trained on block_size tokens at most, so when the cache is full the window restarts from the
    newest half of the context (re-encoded in one pass) rather than recomputing the whole window every token.
    """
    device = next(model.parameters()).device
    block_size = model.config.block_size
    generator = torch.Generator(device=device).manual_seed(seed)
    ids, cache = list(prompt), None
    for _ in range(max_new_tokens):
        if cache is None or cache.pos == block_size:
            window = ids[-block_size:] if cache is None else ids[-max(1, block_size // 2):]
            cache = model.new_cache(1, device, dtype)
            step_input = window
        else:
            step_input = ids[-1:]
        with autocast(device, dtype):
            logits, _ = model(torch.tensor([step_input], device=device), cache=cache)
        ids.append(_pick(logits[0, -1], temperature, top_k, top_p, generator))
        yield ids[-1]


def generate(model: LanguageModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
             top_p: float = 1.0) -> list[int]:
    """All of `stream_ids` at once."""
    return list(stream_ids(model, prompt, max_new_tokens, temperature, top_k, seed, dtype, top_p))


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of `text` not to send yet: an unfinished UTF-8 sequence (decoded as U+FFFD) or
    the beginning of a stop string, which the next tokens may complete."""
    unfinished = len(text) - len(text.rstrip("\ufffd"))
    partial = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(unfinished, partial)


class TextStream:
    """Iterating yields the decoded text of a continuation piece by piece, ending before the first stop
    string, at the end-of-text token or after max_new_tokens; then `finish_reason` is "stop" or "length"
    (OpenAI's words) and `tokens` the number of tokens generated."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int,
                 temperature: float, top_k: int | None, top_p: float, seed: int, stop: Sequence[str] = (),
                 dtype: torch.dtype = torch.float32):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids = stream_ids(model, prompt, max_new_tokens, temperature, top_k, seed, dtype, top_p)
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
            ready = len(text) - _held_back(text, self.stop)
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


def instruct(model: LanguageModel, tokenizer: Tokenizer, fmt: PromptFormat, instruction: str, input: str = "",
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
             seed: int = 1337, dtype: torch.dtype = torch.float32) -> str:
    """The model's answer to an instruction asked in `fmt`, up to the format's end marker."""
    prompt = fmt.render(instruction, input)
    tokenizer.check(prompt, "the instruction")
    ids = tokenizer.encode(prompt)[-model.config.block_size:]
    return TextStream(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, [fmt.end], dtype).text()


def sample_run(run_dir: Path, prompt: str = "", max_new_tokens: int = 500, temperature: float = 0.8,
               top_k: int | None = None, seed: int = 1337, checkpoint: str = "best", device: str = "auto",
               instruction: str | None = None, input: str = "") -> tuple[str, int]:
    """Sample from a run with its own tokenizer; returns (prompt + continuation, checkpoint step). With an
    instruction, returns the answer alone, asked in the run's prompt format (see `lmlab.finetune`)."""
    torch_device = resolve_device(device)
    model, cfg, state = load_run_model(Path(run_dir), checkpoint, torch_device)
    tokenizer = load_run_tokenizer(Path(run_dir))
    dtype = autocast_dtype(torch_device, cfg.train.dtype)
    if instruction is not None:
        fmt = prompt_format(Path(run_dir), tokenizer)
        return instruct(model, tokenizer, fmt, instruction, input, max_new_tokens, temperature, top_k,
                        seed=seed, dtype=dtype), state["step"]
    tokenizer.check(prompt, "--prompt")
    start = tokenizer.encode(prompt) if prompt else document_start(tokenizer)
    out = generate(model, start, max_new_tokens, temperature, top_k, seed, dtype)
    return prompt + tokenizer.decode(out), state["step"]
