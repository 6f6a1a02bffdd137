"""Eager decoding of a grouped-query model: the cached attention as it is (each group of query heads folded into
its key/value head's query length) against as it was (the group dimension broadcast, which matmul copies).

    python benchmarks/gqa_decode.py [--tokens 32] [--repeats 3] [--layers 4] [--contexts 256,1024,2048]
                                    [--batches 1,8] [--device cpu]

The model has Qwen2.5-0.5B's layer shape (896 wide, 14 query heads sharing 2 key/value heads, so 7 to a group, of
64 channels; SwiGLU 4864 wide; biases on q, k and v) with random weights, `--layers` of its 24 layers and a
65-token vocabulary, so that the step's time is the layers' rather than a 151,936-token head's. Each row decodes
`--tokens` tokens in fp32 at batch `--batches`, with every row's cache already holding a context (random keys
and values) that ends `--tokens` positions before a live length of `--contexts`: the step attends over exactly
that many positions, as lmlab's decoder does for rows that hold up to that many tokens. The two paths take turns
step by step, each over its own cache, `--repeats` times; each figure is the rows' tokens over the median step's
seconds. "attention" is one layer's cached attention alone (broadcast -> folded, the median of 50 x `--repeats`
calls each, taking turns), and "copied" is what the broadcast's copies write per token.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from rich.table import Table

import lmlab.model.gpt
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import ModelConfig
from lmlab.core.device import resolve_device
from lmlab.core.progress import ItemProgress
from lmlab.inference.decode import step_logits
from lmlab.model import build_model


def broadcast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lmlab.model.attention.attend_written_out before the fold: the group dimension broadcast against the cache."""
    B, nh, T, hs = q.shape
    groups = q.view(B, k.size(1), nh // k.size(1), T, hs)  # (B, nkv, nh/nkv, T, hs)
    scores = groups @ k.unsqueeze(2).transpose(-2, -1) * hs ** -0.5  # (B, nkv, nh/nkv, T, block_size)
    scores = scores.float().masked_fill(~mask.unsqueeze(1), float("-inf"))
    y = torch.softmax(scores, dim=-1).type_as(v) @ v.unsqueeze(2)  # (B, nkv, nh/nkv, T, hs)
    return y.view(B, nh, T, hs)


PATHS = ("broadcast", "folded")


@contextlib.contextmanager
def attention(path: str):
    """The model's cached attention for the duration: `folded` (lmlab's) or `broadcast` (the one above)."""
    folded = lmlab.model.gpt.attend_written_out
    lmlab.model.gpt.attend_written_out = folded if path == "folded" else broadcast_attention
    try:
        yield
    finally:
        lmlab.model.gpt.attend_written_out = folded


def filled_cache(model, batch: int, context: int, tokens: int):
    """A decode state whose rows hold a context (random keys and values) `tokens` positions short of `context`,
    shortened to `context` positions: what the decoder attends over while its rows hold up to that many tokens."""
    cache = model.new_cache(batch, next(model.parameters()).device, torch.float32)
    for cached in (*cache.k, *cache.v):
        cached.normal_()
    cache.empty = False
    state = cache.shortened(context)
    state.pos.fill_(context - tokens)
    return state


@torch.no_grad()
def step_seconds(model, batch: int, context: int, tokens: int) -> dict[str, list[float]]:
    """The seconds of each of `tokens` eager steps on each path, the paths taking turns step by step (so a busy
    moment of the machine falls on both), each over its own cache."""
    idx = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
    states = {path: filled_cache(model, batch, context, tokens + 1) for path in PATHS}
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    for token in range(tokens + 1):  # the first step of each path warms up
        for path, state in states.items():
            with attention(path):
                started = time.perf_counter()
                step_logits(model, torch.float32, idx, state)  # the eager step
                if token:
                    seconds[path].append(time.perf_counter() - started)
    return seconds


@torch.no_grad()
def attention_seconds(config: ModelConfig, batch: int, context: int, calls: int, device) -> dict[str, float]:
    """The median seconds of one layer's cached attention of one token a row on each path, taking turns."""
    q = torch.randn(batch, 1, config.n_head, config.head_size, device=device).transpose(1, 2)  # (B, nh, 1, hs)
    k, v = (torch.randn(batch, config.kv_heads, config.block_size, config.head_size, device=device)[:, :, :context]
            for _ in range(2))  # (B, nkv, context, hs), a view of a cache of the whole context, as decoding reads
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=device)
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(calls):
        for path, attend in (("broadcast", broadcast_attention), ("folded", lmlab.model.gpt.attend_written_out)):
            started = time.perf_counter()
            attend(q, k, v, mask)
            seconds[path].append(time.perf_counter() - started)
    return {path: statistics.median(times) for path, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", default="256,1024,2048")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    contexts, batches = [int(n) for n in args.contexts.split(",")], [int(n) for n in args.batches.split(",")]
    config = ModelConfig(n_layer=args.layers, n_embd=896, n_head=14, n_kv_head=2, mlp_hidden=4864, vocab_size=65,
                         block_size=max(contexts), bias="qkv", pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                         rope_theta=1e6, norm_eps=1e-6)
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    table = Table(title=f"Eager fp32 decoding, Qwen2.5-0.5B's layers x {args.layers} (14 query heads, 2 key/value, "
                        f"64 wide), {args.tokens} tokens a row, on {device} ({torch.get_num_threads()} threads, "
                        f"torch {torch.__version__})")
    for column in ("batch", "context", "broadcast tok/s", "folded tok/s", "speed-up", "attention µs/layer",
                   "copied MB/token"):
        table.add_column(column, justify="right")
    cases = [(batch, context) for batch in batches for context in contexts]
    progress, warnings = ItemProgress(console, len(cases) * args.repeats), []
    for batch, context in cases:
        seconds: dict[str, list[float]] = {path: [] for path in PATHS}
        for repeat in range(args.repeats):
            progress.start(f"batch {batch}, context {context}: round {repeat + 1}")
            with LoadMeter() as meter:
                for path, times in step_seconds(model, batch, context, args.tokens).items():
                    seconds[path] += times
            warnings.append(busy_warning(f"batch {batch}, context {context}, round {repeat + 1}", meter.load,
                                         "its tokens/s read low (the median step is kept)"))
        rate = {path: batch / statistics.median(times) for path, times in seconds.items()}
        alone = attention_seconds(config, batch, context, 50 * args.repeats, device)
        # Per layer and step: k and v, each copied once per group (B, nkv, g, context, hs), 4 bytes a value.
        copied = args.layers * 2 * batch * config.n_head * context * config.head_size * 4 / batch / 1e6
        table.add_row(str(batch), str(context), f"{rate['broadcast']:,.1f}", f"{rate['folded']:,.1f}",
                      f"{rate['folded'] / rate['broadcast']:.2f}x",
                      f"{alone['broadcast'] * 1e6:,.0f} -> {alone['folded'] * 1e6:,.0f}", f"{copied:,.1f}")
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
