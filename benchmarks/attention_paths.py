"""The two attention paths on this machine: one layer's attention (forward and backward) at shapes from the demo's to
GPT-2 small's context, and whole training steps of the demo's size, each path in turns (a load weighs on both).

    python benchmarks/attention_paths.py [--dtype auto|float32|bfloat16] [--rounds 7]

Prints the host's matmul peak, a table of layer timings (ms, the best of the rounds) with the path the machine's rule
(`train.attention = "auto"`, lmlab.core.machine) takes at each shape, and a table of training steps of the demo's
size (3 layers of 192, 16 x 256 tokens, Muon) by each path: ms/step, tokens/s, MFU. These timings are what the rule
rests on: rerun it on a new kind of host and move the rule where they move.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from rich.table import Table

from lmlab.commands.common import console
from lmlab.core.config import ModelConfig, RunConfig, TrainConfig
from lmlab.core.machine import Machine
from lmlab.core.peak import choose_dtype, peak_flops
from lmlab.core.threads import ThreadChooser
from lmlab.model import build_model
from lmlab.model.attention import attend
from lmlab.train.step import TrainStep

CPU = torch.device("cpu")
PATHS = ("fused", "math")
# (batch, heads, context, head width): the demo's sizes, then longer contexts to GPT-2 small's.
SHAPES = [(16, 2, 256, 64), (16, 3, 256, 64), (16, 4, 256, 64), (16, 3, 128, 64), (8, 4, 256, 64), (4, 6, 512, 64),
          (2, 12, 1024, 64)]
DEMO = ModelConfig(n_layer=3, n_head=3, n_embd=192, block_size=256, vocab_size=76, bias=False, pos_emb="rope",
                   norm="rmsnorm", mlp="swiglu", qk_norm=True)


def machine(dtype: torch.dtype) -> Machine:
    return Machine(CPU, dtype, ThreadChooser(torch.get_num_threads(), "train.threads"))


def layer_timer(config: ModelConfig, batch: int, dtype: torch.dtype):
    """One layer's attention at `config`'s shape over `batch` sequences in `dtype`, forward and backward, timed."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, config.n_head, config.block_size, config.head_size, generator=g).to(dtype)
               .requires_grad_() for _ in range(3))

    def run(path: str) -> float:
        began = time.perf_counter()
        attend(q, k, v, path, 0.0).sum().backward()
        return time.perf_counter() - began

    return run


def layers(dtype: torch.dtype, rounds: int) -> Table:
    table = Table(title=f"one layer's attention, forward and backward, {str(dtype).removeprefix('torch.')} "
                        f"(ms, best of {rounds})")
    for column in ("batch x heads x context x width", "fused", "math", "math / fused", "the rule takes"):
        table.add_column(column, justify="right")
    for batch, heads, context, width in SHAPES:
        config = ModelConfig(n_layer=1, n_head=heads, n_embd=heads * width, block_size=context, vocab_size=76)
        timer = layer_timer(config, batch, dtype)
        for path in PATHS:
            timer(path)
        best = {path: min(timer(path) for _ in range(rounds)) * 1000 for path in PATHS}
        ratio = best["math"] / best["fused"]
        table.add_row(f"{batch} x {heads} x {context} x {width}", f"{best['fused']:.2f}", f"{best['math']:.2f}",
                      f"{ratio:.2f}", machine(dtype).attention("auto", "", context, True))
    return table


def steps(dtype: torch.dtype, rounds: int, peak: float) -> Table:
    cfg = RunConfig(model=DEMO, train=TrainConfig(batch_size=16, optimizer="muon", learning_rate=3.5e-3))
    trainers = {}
    for path in PATHS:
        torch.manual_seed(0)
        train = dataclasses.replace(cfg.train, attention=path)
        trainers[path] = TrainStep(build_model(DEMO), train, machine(dtype))
    tokens = torch.randint(0, DEMO.vocab_size, (16, DEMO.block_size), generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    for turn in range(rounds + 1):
        for path, step in trainers.items():
            began = time.perf_counter()
            step([(tokens, tokens)], 1, 1e-3)
            if turn:  # the first: allocations, caches
                seconds[path].append(time.perf_counter() - began)
    flops = trainers["fused"].model.flops_per_token() * tokens.numel()
    console.print(f"The demo's size: {trainers['fused'].model.describe()}, 16 x {DEMO.block_size} tokens a step, Muon")
    table = Table(title=f"its training steps, median of {rounds}")
    for column in ("path", "ms/step", "tokens/s", "MFU"):
        table.add_column(column, justify="right")
    for path, times in seconds.items():
        median = sorted(times)[len(times) // 2]
        table.add_row(path, f"{1000 * median:.1f}", f"{tokens.numel() / median:,.0f}",
                      f"{100 * flops / median / peak:.1f}%")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dtype, why = choose_dtype(CPU, args.dtype)
    peak = peak_flops(CPU, dtype).flops
    console.print(f"{torch.get_num_threads()} threads; dtype {str(dtype).removeprefix('torch.')} ({why}); matmul peak "
                  f"{peak / 1e12:.3f} TFLOP/s")
    console.print(layers(dtype, args.rounds))
    console.print(steps(dtype, args.rounds, peak))


if __name__ == "__main__":
    main()
