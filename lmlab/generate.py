"""Sampling, carrying what the model keeps between tokens: a transformer's KV cache or a recurrent state."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmlab.data.tokenizers import Tokenizer
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.model import LanguageModel
from lmlab.runs import load_run_model


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: LanguageModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[int]:
    """Continue `prompt` by `max_new_tokens` tokens; temperature 0 is greedy.

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
        ids.append(_pick(logits[0, -1], temperature, top_k, generator))
    return ids[len(prompt):]


def sample_run(run_dir: Path, prompt: str = "", max_new_tokens: int = 500, temperature: float = 0.8,
               top_k: int | None = None, seed: int = 1337, checkpoint: str = "best",
               device: str = "auto") -> tuple[str, int]:
    """Sample from a run with its own tokenizer; returns (prompt + continuation, checkpoint step)."""
    torch_device = resolve_device(device)
    model, cfg, state = load_run_model(Path(run_dir), checkpoint, torch_device)
    meta = json.loads((Path(run_dir) / "dataset.json").read_text())
    tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer.json", meta["tokenizer"])
    tokenizer.check(prompt, "--prompt")
    # With no prompt, start where a document starts: after an end-of-text token, or a blank line for char.
    if prompt:
        start = tokenizer.encode(prompt)
    else:
        start = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    out = generate(model, start, max_new_tokens, temperature, top_k, seed, autocast_dtype(torch_device, cfg.train.dtype))
    return prompt + tokenizer.decode(out), state["step"]
