"""Train the demo preset (or --config) and report the val loss it reaches after 60, 120 and 300 seconds.

    python benchmarks/cpu_time_to_loss.py [--config configs/shakespeare-char-modern-cpu.toml] [--set k=v ...]

Prepares data/shakespeare-char if needed, trains into runs/bench-cpu-<time>, then prints one table from
the run's metrics.jsonl: best val loss reached by each time mark (wall time, evaluations included), the
time to first reach val 1.90 and 1.60, tokens/s and ms per optimizer step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job


def first_time_below(evals: list[dict], target: float) -> str:
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    return f"{hit['elapsed']:.0f} s (step {hit['step']})" if hit else "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--run", default=f"runs/bench-cpu-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    cfg = load_config(Path(args.config), args.set)
    prepare(["shakespeare"], "char", out_dir=Path(cfg.data.dataset).parent)
    with LoadMeter() as meter:  # the run prints its progress as it trains
        Trainer(train_job(cfg, Path(args.run), "cpu", console=console)).run()

    events = RunDir(Path(args.run)).events()
    evals = [e for e in events if e["event"] == "eval"]
    steps = [e for e in events if e["event"] == "train"]
    end = next(e for e in events if e["event"] == "end")
    rate = sum(e["tokens_per_sec"] for e in steps) / len(steps)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.model.block_size
    table = Table(title=f"{args.config} {' '.join(args.set)} on the CPU ({Path(args.run)})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for mark in (60, 120, 300):
        reached = [e["val_loss"] for e in evals if e["elapsed"] <= mark]
        table.add_row(f"best val loss by {mark} s", f"{min(reached):.4f}" if reached else "no eval yet")
    table.add_row("time to val 1.90", first_time_below(evals, 1.90))
    table.add_row("time to val 1.60", first_time_below(evals, 1.60))
    table.add_row("final best val loss", f"{end['best_val_loss']:.4f} at step {end['best_step']}")
    table.add_row("wall time (train + eval)", f"{end['elapsed']:.0f} s for {end['step']} steps")
    table.add_row("tokens/s (training steps)", f"{rate:,.0f}")
    table.add_row("ms per optimizer step", f"{1000 * tokens_per_step / rate:.0f}")
    console.print(table)
    warning = busy_warning("the run", meter.load, "its times read long and its tokens/s low")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
