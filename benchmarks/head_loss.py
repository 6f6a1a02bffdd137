"""The head's loss in a training step on this machine's CPU: the plain path (the whole (B, T, vocab) logits and
torch's cross-entropy) against lmlab.model.loss.ChunkedHeadLoss (a chunk of rows at a time, never the whole logits),
each timed in turns (a load weighs on both alike), at GPT-2's vocabulary and shapes, or at the demo recipe's shapes
on a corpus of words or a small BPE (`--shapes demo`, its vocabulary 4,096: lmlab pads it to 4,160).

    python benchmarks/head_loss.py [--rounds 5] [--dtype float32|bfloat16] [--shapes gpt2|demo]

Prints, for each shape, the best forward and backward of the head's loss (the states given) and of the whole model,
by each path and by the chunked one in smaller chunks, and the fp32 logits the plain path writes.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.table import Table

from lmlab.commands.common import console
from lmlab.core.config import ModelConfig
from lmlab.model import build_model
from lmlab.model.loss import CHUNK_BYTES, head_loss, next_token_loss

SHAPES = {"gpt2": (50257, [(8, 256, 256, 2), (8, 512, 512, 2), (4, 1024, 768, 1)]),  # vocabulary; batch, context,
          "demo": (4096, [(16, 256, 64, 1), (16, 256, 192, 3)])}  # width, layers


def timed(run, rounds: int, dtype: torch.dtype) -> float:  # noqa: ANN001 (a step)
    """The best seconds of `run()` and its backward."""
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            loss = run()
        loss.backward()
        best = min(best, time.perf_counter() - began)
    return best


def row(vocab: int, batch: int, context: int, width: int, layers: int, rounds: int, dtype: torch.dtype
        ) -> list[str]:
    model = build_model(ModelConfig(n_layer=layers, n_head=width // 64, n_embd=width, block_size=context,
                                    vocab_size=vocab))
    x = torch.randint(0, vocab, (batch, context))
    states = model.hidden(x).detach().requires_grad_()
    logits = batch * context * model.lm_head.weight.size(0) * 4
    smaller = min(logits, CHUNK_BYTES) // 8
    runs = {"head: plain": lambda: next_token_loss(model.lm_head(states)[..., :vocab], x),
            "chunked": lambda: head_loss(model.lm_head, states, x, vocab, True)[1],
            "chunked / 8": lambda: head_loss(model.lm_head, states, x, vocab, True, smaller)[1],
            "whole step: plain": lambda: next_token_loss(model.lm_head(model.hidden(x))[..., :vocab], x),
            "whole step: chunked": lambda: model(x, x)[1]}
    best = {name: float("inf") for name in runs}
    for _ in range(2):  # each run in turn, twice: the first rounds warm allocations and caches
        for name, run in runs.items():
            best[name] = min(best[name], timed(run, rounds, dtype))
    return [f"{batch} x {context}, {width}", f"{logits / 2**20:,.0f} MiB",
            *(f"{1000 * seconds:,.1f}" for seconds in best.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--shapes", default="gpt2", choices=SHAPES)
    args = parser.parse_args()
    dtype, (vocab, shapes) = getattr(torch, args.dtype), SHAPES[args.shapes]
    table = Table(title=f"a training step's head loss at a vocabulary of {vocab:,}, {args.dtype}, "
                        f"{torch.get_num_threads()} threads (ms, best of {args.rounds}, in turns)")
    for column in ("batch x context, width", "fp32 logits", "head: plain", "chunked", "chunked / 8",
                   "whole step: plain", "chunked"):
        table.add_column(column, justify="right")
    for shape in shapes:
        cells = row(vocab, *shape, args.rounds, dtype)
        console.print(" | ".join(cells), highlight=False)  # as it goes: the larger shapes take minutes
        table.add_row(*cells)
    console.print(table)


if __name__ == "__main__":
    main()
