"""What `torchrun --nproc_per_node=1` costs against the plain command, for the CPU preset.

    python benchmarks/torchrun_overhead.py [--steps 100] [--repeats 2]

Prepares data/shakespeare-char if needed, then trains the preset for --steps steps on the CPU through each
launcher in turn (alternating, so a change in the machine's load hits both alike) and prints, per launcher,
the best of the repeats: the command's wall time (process start, torch import and rendezvous included), the
training tokens/s from metrics.jsonl (DDP's gradient hooks and the per-step stop-flag all-reduce show here),
and the loss at the last step. The one-process rows use torch's default of one thread per core. The
two-process row keeps the tokens per step (grad_accum_steps 2 of 8 sequences) and runs Gloo on the same
cores with one thread per process (torchrun sets OMP_NUM_THREADS=1 when it starts more than one): it is
not a speedup test on a small CPU, and on a busy machine it mostly measures how badly two threads per
process contend with other work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir

CONFIG = "configs/shakespeare-char-cpu.toml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
LAUNCHERS = {
    "plain `lmlab train`": ([sys.executable, "-m", "lmlab"], []),
    "torchrun --nproc_per_node=1 (DDP)": ([*TORCHRUN, "--nproc_per_node=1", "-m", "--", "lmlab"], []),
    "torchrun --nproc_per_node=2 (DDP, Gloo, 1 thread each)": ([*TORCHRUN, "--nproc_per_node=2", "-m", "--", "lmlab"],
                                                                ["train.grad_accum_steps=2", "train.batch_size=8"]),
}


def train(launcher: list[str], settings: list[str], steps: int, run: Path) -> dict[str, float]:
    sets = [arg for s in [f"train.max_iters={steps}", *settings] for arg in ("--set", s)]
    started = time.perf_counter()
    subprocess.run([*launcher, "train", CONFIG, "--run", str(run), "--device", "cpu", *sets], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    train_events = [e for e in RunDir(run).events() if e["event"] == "train"]
    rate = sum(e["tokens_per_sec"] for e in train_events) / len(train_events)
    return {"wall": wall, "rate": rate, "loss": train_events[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(CONFIG)).data.dataset).parent)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in LAUNCHERS}
    progress = ItemProgress(console, args.repeats * len(LAUNCHERS))
    with tempfile.TemporaryDirectory(dir=".") as runs, LoadMeter() as meter:
        for repeat in range(args.repeats):
            for i, (name, (launcher, settings)) in enumerate(LAUNCHERS.items()):
                progress.start(f"{name}, repeat {repeat + 1}/{args.repeats}")
                results[name].append(train(launcher, settings, args.steps, Path(runs) / f"{repeat}-{i}"))
    plain = max(r["rate"] for r in results[next(iter(LAUNCHERS))])
    table = Table(title=f"{CONFIG}, {args.steps} steps on the CPU (best of {args.repeats})")
    for column in ("launcher", "wall time", "tokens/s", "vs plain", f"loss at step {args.steps}"):
        table.add_column(column, justify="left" if column == "launcher" else "right")
    for name, runs_of in results.items():
        wall, rate = min(r["wall"] for r in runs_of), max(r["rate"] for r in runs_of)
        table.add_row(name, f"{wall:.1f} s", f"{rate:,.0f}", f"{rate / plain:.2f}x", f"{runs_of[-1]['loss']:.4f}")
    console.print(table)
    warning = busy_warning("the runs", meter.load, "their times read long")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
