"""The memory preflight's estimate of a training step (lmlab.model.memory.training_need) beside the peak a real step
reaches on this machine's CPU, for several model shapes and micro-batches, in fp32 and bf16 autocast.

    python benchmarks/memory_estimate.py [--sizes 1,4,16]

Each point runs in a process of its own: the model and its training step are built, then the high-water RSS of
two steps above what was resident before them (the weights) is what the estimate, less the weights, predicts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from rich.table import Table

from lmlab.commands.common import console, counts
from lmlab.core.config import ModelConfig
from lmlab.core.humanize import fmt
from lmlab.model.memory import model_bytes, training_need

SHAPES = {
    "demo (4L/256, rope, swiglu, context 128)": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=65,
                                                       pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                                                       bias=False),
    "GPT-2 vocabulary (2L/768, context 512)": dict(n_layer=2, n_head=12, n_embd=768, block_size=512, vocab_size=50257),
    "GRU (2 x 512, context 128)": dict(kind="recurrent", n_layer=2, n_embd=512, block_size=128, vocab_size=65),
    "long context (2L/128, context 2048)": dict(n_layer=2, n_head=4, n_embd=128, block_size=2048, vocab_size=65),
}

STEP = """
import json, sys, torch
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.machine import Machine
from lmlab.core.threads import ThreadChooser
from lmlab.model import build_model
from lmlab.train.step import TrainStep
cfg, batch, dtype = ModelConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4:
    torch.set_num_threads(int(sys.argv[4]))
machine = Machine(torch.device("cpu"), getattr(torch, dtype), ThreadChooser(torch.get_num_threads(), "threads"))
step = TrainStep(build_model(cfg), TrainConfig(batch_size=batch, compile=False, dtype=dtype), machine)
x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
def status(key):
    return int(open("/proc/self/status").read().split(key)[1].split()[0]) * 1024
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on
for _ in range(2):
    step([(x, x)], 1, 1e-3)
print(status("VmHWM:") - base)
"""


def measured(shape: dict, batch: int, dtype: str, threads: int | None = None) -> int:
    """The high-water RSS of two training steps above what was resident before them, in a process of its own
    (with `threads`, torch pinned to that many)."""
    extra = [] if threads is None else [str(threads)]
    done = subprocess.run([sys.executable, "-c", STEP, json.dumps(shape), str(batch), dtype, *extra],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=counts, default=[1, 4, 16], help="micro-batches")
    args = parser.parse_args()
    table = Table(title="A training step's memory above its weights: the preflight's estimate and the measured peak "
                        "RSS (CPU)")
    for column in ("model", "micro-batch", "estimate", "fp32 peak", "estimate / fp32", "bf16 peak", "estimate / bf16"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, shape in SHAPES.items():
        config = ModelConfig(**shape)
        need, weights = training_need(config), model_bytes(config)
        for batch in args.sizes:
            with console.status(f"{name}, micro-batch {batch}..."):
                estimate = need.at(batch) - weights
                fp32, bf16 = measured(shape, batch, "float32"), measured(shape, batch, "bfloat16")
            table.add_row(name, str(batch), f"{estimate / 2**20:,.0f} MiB", f"{fp32 / 2**20:,.0f} MiB",
                          fmt(estimate / fp32, ".2f"), f"{bf16 / 2**20:,.0f} MiB", fmt(estimate / bf16, ".2f"))
    console.print(table)


if __name__ == "__main__":
    main()
