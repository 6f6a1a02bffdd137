"""Eager fp32 against lmlab's default fast path, for three recipes, on whatever device is present.

    python benchmarks/throughput.py [--device auto] [--steps 5]

Rows: the CPU preset, the classic Shakespeare GPU recipe (6L/6H/384, block 256, batch 64) and GPT-2 small
(12L/12H/768, block 1024, vocab 50257 padded to 50304). "eager fp32" is train.dtype = float32 with
compile off; "default" is the preset as shipped plus train.dtype = auto (bf16 autocast where it runs fastest:
on a CPU, where it measured faster than fp32) and train.compile = true. Random tokens; no dataset needed. A line
says so when the machine was busy while a row was timed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import busy_warning
from lmlab.core.config_toml import load_config
from lmlab.core.device import resolve_device
from lmlab.core.machine import Machine
from lmlab.core.progress import ItemProgress
from lmlab.experiments.bench import bench_batch

RECIPES = {
    "CPU preset (4L/256, block 128)": ("configs/shakespeare-char-cpu.toml", ["model.vocab_size=76"]),
    "Shakespeare GPU recipe (6L/384, block 256)": ("configs/shakespeare-char.toml", ["model.vocab_size=76"]),
    "GPT-2 small (12L/768, block 1024)": ("configs/gpt2-small.toml", ["train.grad_accum_steps=1"]),
}
PATHS = {"eager fp32": ["train.dtype=float32", "train.compile=false"],
         "default (auto dtype)": ["train.dtype=auto", "train.compile=false"],
         "default + compile": ["train.dtype=auto", "train.compile=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpt2-batch", type=int, default=0, help="GPT-2 micro-batch (default: 1 on CPU, 16 on GPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    table = Table(title=f"Training throughput on {device} (torch {torch.__version__})")
    for column in ("recipe", "path", "micro-batch", "tokens/s", "ms/step", "MFU", "speed-up"):
        table.add_column(column, justify="left" if column in ("recipe", "path") else "right")
    progress, warnings = ItemProgress(console, len(RECIPES) * len(PATHS)), []
    for recipe, (path, overrides) in RECIPES.items():
        base = None
        for name, settings in PATHS.items():
            cfg = load_config(Path(path), overrides + settings)
            batch = cfg.train.batch_size
            if "GPT-2" in recipe:
                batch = args.gpt2_batch or (1 if device.type == "cpu" else 16)
            progress.start(f"{recipe}, {name}, micro-batch {batch}")
            row = bench_batch(cfg, batch, args.steps, Machine.of(args.device, cfg.train.dtype, cfg.train.threads))
            if row.out_of_memory:
                table.add_row(recipe, name, str(batch), "out of memory", "-", "-", "-")
                continue
            base = base or row.tokens_per_sec
            table.add_row(recipe, name, str(batch), f"{row.tokens_per_sec:,.0f}", f"{row.ms_per_step:.0f}",
                          "-" if row.mfu is None else f"{100 * row.mfu:.1f}%", f"{row.tokens_per_sec / base:.2f}×")
            warnings.append(busy_warning(f"{recipe}, {name}", row.load, "its tokens/s reads low"))
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
