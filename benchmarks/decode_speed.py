"""Batch-1 greedy decoding speed: lmlab's decoder eager and compiled, fp32 and bf16, against nanoGPT's way.

    python benchmarks/decode_speed.py [--tokens 1000] [--repeats 3] [--device cpu]

Two shapes with random weights and a 65-character vocabulary: nanoGPT's CPU Shakespeare model (4 layers, 128
wide, 4 heads, context 64) and lmlab's demo model (configs/shakespeare-char-modern-cpu.toml: 4 layers, 256 wide,
rope, rmsnorm, swiglu, qk-norm, context 128). Each row decodes `--tokens` tokens from one token, in this
process, timed from the first step to the last (compiling is timed apart); the rows of a shape alternate, and
each figure is the best of `--repeats` runs. "no cache" is nanoGPT's `generate`: the whole window (cropped to the
context) recomputed every token. bf16 is autocast, as training runs; eager bf16 casts each weight every step,
compiled bf16 has the casts folded into the frozen weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.core.device import autocast, resolve_device
from lmlab.core.progress import ItemProgress
from lmlab.inference.compiled import compile_step
from lmlab.inference.decode import Decoder, Sequence
from lmlab.model import build_model

SHAPES = {
    "nanoGPT CPU (4L/128, ctx 64)": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "demo (4L/256, ctx 128)": ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=65, bias=False,
                                          pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def no_cache(model, tokens: int, dtype: torch.dtype) -> float:
    """nanoGPT's generate: crop to the context, run the whole window, take the last position's argmax."""
    device = next(model.parameters()).device
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    started = time.perf_counter()
    for _ in range(tokens):
        with autocast(device, dtype):
            logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens / (time.perf_counter() - started)


def decoder_run(model, tokens: int, dtype: torch.dtype, step) -> float:
    decoder = Decoder(model, 1, dtype, step)
    seq = Sequence([0], SamplingParams(max_new_tokens=tokens, temperature=0))
    started = time.perf_counter()
    decoder.join(seq)
    while not seq.exhausted:
        decoder.step()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    table = Table(title=f"Batch-1 greedy decoding, {args.tokens} tokens, on {device} ({torch.get_num_threads()} "
                        f"threads, torch {torch.__version__})")
    for column in ("model", "path", "dtype", "tokens/s", "compile s"):
        table.add_column(column, justify="left" if column in ("model", "path", "dtype") else "right")
    progress, warnings = ItemProgress(console, len(SHAPES) * (len(DTYPES) + args.repeats)), []
    for shape, config in SHAPES.items():
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
        runs, compile_seconds = {}, {}
        for name, dtype in DTYPES.items():
            progress.start(f"{shape}: compiling the {name} decode step")
            runs[("no cache (nanoGPT generate)", name)] = lambda d=dtype, m=model: no_cache(m, args.tokens, d)
            runs[("lmlab eager", name)] = lambda d=dtype, m=model: decoder_run(m, args.tokens, d, None)
            started = time.perf_counter()
            step = compile_step(model, 1, dtype)
            compile_seconds[("lmlab compiled", name)] = time.perf_counter() - started
            runs[("lmlab compiled", name)] = lambda d=dtype, s=step, m=model: decoder_run(m, args.tokens, d, s)
        best = {key: 0.0 for key in runs}
        for repeat in range(args.repeats):  # alternate the paths, so that a slow moment of the machine hits all
            progress.start(f"{shape}: decoding {args.tokens} tokens on each of {len(runs)} paths, round {repeat + 1}")
            with LoadMeter() as meter:
                for key, run in runs.items():
                    best[key] = max(best[key], run())
            warnings.append(busy_warning(f"{shape}, round {repeat + 1}", meter.load, "its tokens/s read low (the "
                                         "best of the rounds is kept)"))
        for (path, name), rate in best.items():
            seconds = compile_seconds.get((path, name))
            table.add_row(shape, path, name, f"{rate:,.0f}", "-" if seconds is None else f"{seconds:.0f}")
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
