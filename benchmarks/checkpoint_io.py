"""Checkpoint size, write time and verified-load time on this machine, for the CPU preset and GPT-2 small.

    python benchmarks/checkpoint_io.py [--repeats 3]

Each model gets a real AdamW state (one optimizer step) so the optimizer file is full size. Writes go
through the same atomic path as training (temp folder, fsync, rename, pointer switch). `lmlab bench CONFIG
--checkpoint` measures the same for one config, where its runs go.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import ModelConfig, RunConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.machine import Machine
from lmlab.core.progress import ItemProgress
from lmlab.experiments.bench import checkpoint_cost
from lmlab.experiments.plan import shape_of

MODELS = {
    "CPU preset (char)": load_config(Path("configs/shakespeare-char-cpu.toml")).model,
    "GPT-2 small (124M)": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def measure(config: ModelConfig, repeats: int, device: str = "cpu") -> tuple[int, float, float, float]:
    """Parameters, checkpoint bytes, and the best write and load seconds of a model living on `device` (a GPU's
    copies to and from the host are part of both): `lmlab bench --checkpoint`'s measurement, in a temporary folder
    here."""
    if config.vocab_size == 0:
        config = dataclasses.replace(config, vocab_size=76)
    cfg = RunConfig(model=config, train=TrainConfig(dtype="float32"))
    cost = checkpoint_cost(cfg, Machine.of(device, "float32"), Path("."), repeats)
    return shape_of(cfg).num_params(), cost.bytes, cost.write_seconds, cost.load_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title=f"Checkpoint I/O on this machine (best of {args.repeats})")
    for column in ("model", "parameters", "checkpoint size", "write (atomic, fsynced)", "verified load"):
        table.add_column(column, justify="left" if column == "model" else "right")
    progress, warnings = ItemProgress(console, len(MODELS)), []
    for name, config in MODELS.items():
        progress.start(f"{name}: building it, one optimizer step, then {args.repeats} writes and loads")
        with LoadMeter() as meter:
            params, size, write, load = measure(config, args.repeats)
        table.add_row(name, f"{params / 1e6:.1f}M", f"{size / 2**20:.1f} MiB", f"{write:.2f} s", f"{load:.2f} s")
        warnings.append(busy_warning(name, meter.load, "its times read high"))
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
