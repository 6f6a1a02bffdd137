"""Training throughput and a budget's result on a quiet machine and beside CPU hogs, at lmlab's threads and at fixed
ones: what choosing threads from the load (lmlab/core/threads.py) buys and costs.

    python benchmarks/busy_threads.py [--config configs/shakespeare-char-modern-cpu.toml] [--hogs 1]
        [--steps 20] [--budget 60] [--tree PATH ...]

For each load (quiet; --hogs processes spinning, `python -c "while True: pass"`, started before and killed after each
measurement) and each threads setting (lmlab's default, train.threads = every core, train.threads = 1), as a user
runs them, one process each: `lmlab bench CONFIG --steps N` (tokens/s of the config's micro-batch), and with
--budget S > 0 `lmlab train CONFIG --budget S` (the steps it trained and the val it reached; the threads it ended on).
Each --tree is an lmlab source tree put first on PYTHONPATH (`python -P`), so a version before the change and one
after compare in one sitting (they take turns, case by case). "quiet" is only as quiet as the machine: each row
says what other processes (the hogs left out) took of the cores meanwhile; run it on an otherwise idle machine.

Prints one table: a row per tree, load and threads setting; tokens/s also as a share of the same tree's quiet
default, and the budget's steps and val.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, cores
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir


def lmlab(tree: str, *args: str) -> str:
    """`python -m lmlab ARGS` from `tree` (the installed lmlab for ""), its output; a failure stops the benchmark."""
    env = {**os.environ, "COLUMNS": "200", **({"PYTHONPATH": tree} if tree else {})}
    env.pop("OMP_NUM_THREADS", None)  # the thread setting is the case's own
    done = subprocess.run([sys.executable, "-P", "-m", "lmlab", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lmlab {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def hogged(hogs: int, measure: Callable[[], Any]) -> tuple[Any, float | None]:
    """`measure()` with `hogs` spinning processes beside it (none for 0), and the share of the cores that other
    processes took meanwhile: the hogs and the measured commands are this process's children, so not counted."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        with LoadMeter() as meter:
            result = measure()
    finally:
        for hog in spinning:
            hog.kill()
            hog.wait()
    return result, meter.load.others


def tokens_per_sec(tree: str, config: str, threads: int, steps: int) -> tuple[float, str]:
    """The bench table's tokens/s of the config's micro-batch, and the threads it timed on."""
    out = lmlab(tree, "bench", config, "--device", "cpu", "--steps", str(steps), "--set", f"train.threads={threads}")
    rate = re.search(r"│\s+\d+ │\s+([\d,]+) │", out)
    if rate is None:
        raise SystemExit(f"no tokens/s in the bench output:\n{out}")
    said = re.search(r", (\d+) threads?[;)]", out)  # the table's title (an lmlab from before says none)
    used = said[1] if said else str(threads or len(cores()))
    return float(rate[1].replace(",", "")), used


def budget_run(tree: str, config: str, threads: int, seconds: float, run: Path) -> dict:
    """A `--budget` run: its steps, last val and the threads it trained on at the end."""
    lmlab(tree, "train", config, "--run", str(run), "--device", "cpu", "--budget", f"{seconds:g}s", "--set",
          f"train.threads={threads}")
    events = RunDir(run).events()
    evals = [e for e in events if e["event"] == "eval"]
    changes = [f"{e['threads']}@{e['step']}" for e in events if e["event"] == "threads"]
    return {"steps": events[-1]["step"], "val": evals[-1]["val_loss"] if evals else float("nan"),
            "threads": " ".join(changes) or "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--hogs", type=int, default=1, help="spinning processes in the busy case")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each bench")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of each budgeted run; 0: none")
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(args.config)).data.dataset).parent)
    trees, every = args.tree or [""], len(cores())
    settings = {"default": 0, f"{every} (every core)": every, "1": 1}
    cases = [(hogs, name, tree) for hogs in (0, args.hogs) for name in settings for tree in trees]
    budget = f", a {args.budget:g} s budget" if args.budget else ""
    table = Table(title=f"{args.config} on {every} cores: quiet and beside {args.hogs} CPU hog(s); tokens/s of "
                        f"`lmlab bench --steps {args.steps}`{budget}")
    for column in ("tree", "load", "train.threads", "timed on", "tokens/s", "of quiet default", "steps", "val",
                   "threads changes", "others' CPU"):
        table.add_column(column, justify="left" if column in ("tree", "load", "train.threads") else "right")
    progress, quiet = ItemProgress(console, len(cases)), {}
    with tempfile.TemporaryDirectory(dir=".") as runs:
        for i, (hogs, name, tree) in enumerate(cases, 1):
            load = f"{hogs} hog{'s' * (hogs > 1)}" if hogs else "quiet"
            progress.start(f"{load}, train.threads {name}{', tree ' + tree if tree else ''}")

            def measure(tree=tree, name=name, i=i):
                rate = tokens_per_sec(tree, args.config, settings[name], args.steps)
                trained = budget_run(tree, args.config, settings[name], args.budget, Path(runs) / f"run{i}") \
                    if args.budget else {"steps": "-", "val": float("nan"), "threads": "-"}
                return rate, trained

            ((rate, used), trained), others = hogged(hogs, measure)
            if not hogs and name == "default":
                quiet[tree] = rate
            share = f"{100 * rate / quiet[tree]:.0f}%" if quiet.get(tree) else "-"
            console.print(f"    {rate:,.0f} tokens/s on {used} thread(s), {trained['steps']} steps, val "
                          f"{trained['val']:.4f}", highlight=False)
            table.add_row(tree or "installed", load, name, used, f"{rate:,.0f}", share, str(trained["steps"]),
                          f"{trained['val']:.4f}", trained["threads"],
                          "-" if others is None else f"{100 * others:.0f}%")
    console.print(table)


if __name__ == "__main__":
    main()
