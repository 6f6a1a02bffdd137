"""What `train.compile = true` costs on this machine's CPU, and whether it pays: the same training run eager and
compiled, each in a process of its own with an empty Inductor cache (a first compile, as a user's first run has).

    python benchmarks/compile_cpu.py [--config configs/shakespeare-char-modern-cpu.toml] [--steps 200]
        [--eval-iters 20] [--threads N] [--repeats 1] [--size DEPTH]

Each run is `lmlab train CONFIG --device cpu` with a line per step, one evaluation at its end and the threads fixed
(every core by default: the comparison is of the code, not of lmlab's choice under load). From its metrics.jsonl:
the seconds to the end of step 1 (the compile happens in it), the median tokens/s of the steps after the second,
the seconds of the final evaluation (eager in both: a compiled model on a CPU evaluates eagerly), and the run's wall
time. `train.compile = "auto"` trains eager on a CPU because of these figures (docs/reference/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning, cores
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir


def train(config: str, compiled: bool, steps: int, eval_iters: int, threads: int, size: int, folder: Path
          ) -> dict[str, float]:
    """One run, eager or compiled, in its own process and Inductor cache; its figures."""
    run = folder / ("compiled" if compiled else "eager")
    settings = [f"train.compile={str(compiled).lower()}", f"train.max_iters={steps}", f"train.eval_interval={steps}",
                f"train.eval_iters={eval_iters}", "train.log_interval=1", f"train.threads={threads}",
                "train.budget_seconds=0"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / f"inductor-{run.name}")}
    started = time.perf_counter()
    command = [sys.executable, "-m", "lmlab", "train", config, "--run", str(run), "--device", "cpu",
               *(["--size", str(size)] if size else []), *(arg for s in settings for arg in ("--set", s))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"the {run.name} run failed:\n{done.stderr}")
    events = RunDir(run).events()
    trains = [e for e in events if e["event"] == "train"]
    rates = [e["tokens_per_sec"] for e in trains[2:] if e.get("tokens_per_sec")]
    final = [e for e in events if e["event"] == "eval"][-1]
    return {"first step": trains[0]["elapsed"], "tokens/s": statistics.median(rates) if rates else float("nan"),
            "final eval": final.get("seconds") or float("nan"), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(cores()))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=0,
                        help="layers along the preset's depth dial (lmlab train --size; the demo's --size auto "
                             "trains 3 on 2 cores); default: the preset's own shape")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(args.config)).data.dataset).parent)
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    progress = ItemProgress(console, 2 * args.repeats)
    with tempfile.TemporaryDirectory(dir=".") as folder, LoadMeter() as meter:
        for round_ in range(args.repeats):
            for compiled in (False, True):  # in turns: a load that comes or goes weighs on both alike
                progress.start(f"{'compiled' if compiled else 'eager'}, round {round_ + 1}")
                rows[compiled].append(train(args.config, compiled, args.steps, args.eval_iters, args.threads, args.size,
                                            Path(folder) / str(round_)))
    table = Table(title=f"`lmlab train {args.config}` on {args.threads} CPU threads, {args.steps} steps, median of "
                        f"{args.repeats}: eager against train.compile = true (an empty Inductor cache)")
    columns = ("first step", "tokens/s", "final eval", "wall")
    table.add_column("train.compile")
    for column in columns:
        table.add_column(f"{column} ({'s' if column != 'tokens/s' else 'median'})", justify="right")
    for compiled, runs in rows.items():
        table.add_row("true" if compiled else "false",
                      *(f"{statistics.median(r[c] for r in runs):,.{0 if c == 'tokens/s' else 1}f}" for c in columns))
    console.print(table)
    warning = busy_warning("the runs", meter.load, "their times read long and their tokens/s low")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
