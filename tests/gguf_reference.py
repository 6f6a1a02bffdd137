"""llama.cpp (through llama-cpp-python) as the reference for `lmlab export-gguf`: a GGUF file loaded as llama.cpp
loads it, and the three measurements the tests assert on and `benchmarks/gguf_parity.py` tabulates: tokenization,
a greedy continuation, and the logits of a prompt, each against lmlab's own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from llama_cpp import GGML_TYPE_F32, Llama, llama_cpp

from lmlab.core.config import SamplingParams
from lmlab.inference.generate import stream_ids
from lmlab.run.rundir import LoadedRun

PROMPT = "ROMEO:\nSweet love, "


@contextlib.contextmanager
def llama(path: Path, context: int, cache: int = GGML_TYPE_F32) -> Iterator[Llama]:
    """The file as llama.cpp loads it, one thread, every position's logits kept, its keys and values cached as
    `cache` (float32: llama.cpp's default, float16, rounds them, which alone moves a logit by ~1e-3); closed after
    use. Its weights stay as the file has them (`use_extra_bufts` off): llama.cpp built for a CPU with AMX repacks
    q8_0 weights for its AMX kernels, which crash (SIGSEGV) on the tests' 32-wide matrices, and repacking only
    changes the speed of the same arithmetic."""
    default = llama_cpp.llama_model_default_params

    def as_stored() -> llama_cpp.llama_model_params:
        params = default()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = as_stored  # what Llama() builds its model's parameters from
    try:
        model = Llama(str(path), n_ctx=context, n_threads=1, logits_all=True, verbose=False, type_k=cache,
                      type_v=cache)
    finally:
        llama_cpp.llama_model_default_params = default
    try:
        yield model
    finally:
        model.close()


@dataclass
class Parity:
    tokens_equal: bool
    greedy_equal: bool
    greedy_tokens: int  # how many tokens were compared (fewer than asked where the end-of-text came first)
    distinct: int  # different tokens in lmlab's continuation: a continuation of one token repeated proves little
    max_logit_diff: float


def llama_tokens(model: Llama, text: str) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation: at most n tokens, ending before an end-of-generation token."""
    model.reset()
    out: list[int] = []
    for token in model.generate(prompt, temp=0.0, top_k=1, reset=True):
        if model.token_eos() == token or len(out) == n:
            break
        out.append(token)
    return out


def logits(model: Llama, prompt: list[int]) -> np.ndarray:
    model.reset()
    model.eval(prompt)
    return np.array(model.scores[:len(prompt)])


def parity(path: Path, run: LoadedRun, text: str = PROMPT, n: int = 50) -> Parity:
    """llama.cpp's tokens, greedy continuation (of n tokens, or up to the context) and logits of `text` against
    lmlab's, for the GGUF file `path` exported from `run`."""
    ours = run.tokenizer.encode(text)
    n = min(n, run.config.model.block_size - len(ours))  # llama.cpp has no positions past the context
    mine = list(stream_ids(run.model, ours, SamplingParams(max_new_tokens=n, temperature=0)))
    eot = run.tokenizer.eot_id
    mine = mine[:mine.index(eot)] if eot in mine else mine
    with torch.no_grad():
        expected = run.model(torch.tensor([ours]))[0][0].numpy()
    with llama(path, run.config.model.block_size) as model:
        theirs = llama_tokens(model, text)
        diff = float(np.abs(logits(model, ours) - expected).max())
        continued = greedy(model, ours, len(mine))
    return Parity(theirs == ours, continued == mine, len(mine), len(set(mine)), diff)
