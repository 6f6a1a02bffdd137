"""Whether `lmlab train --budget` ends when its budget does when the machine gets busy mid-run.

    python benchmarks/budget_under_load.py [--budgets 30,60,120] [--hog-at 0.33] [--hogs 2]
        [--config configs/shakespeare-char-speedrun-cpu.toml] [--tree PATH ...]

Prepares data/shakespeare-char if needed, then for each budget trains the config twice as a user does
(`python -m lmlab train CONFIG --budget Ns`, one process each): on a quiet machine, and with --hogs processes
spinning on the CPU (one per core by default: `python -c "while True: pass"`) started --hog-at of the budget after
the command and killed once it exits. Wall time is the process's, start to exit. Each --tree is an lmlab source
tree put first on PYTHONPATH (`python -P`), so two versions compare in one sitting (they take turns). The machine
must be otherwise idle: run it under the heavy lock.

Prints a row per tree, budget and load: wall time against the budget, steps, the plans made (the first and those
after it), the LR at the last step as a share of the peak, the run's final val estimate (train.eval_iters
batches), the threads it changed to and at which step (`threads` events: 1@0 is one thread from the start), and the
machine's load while it ran (other processes' share of the cores, hogs excluded). Before and after choosing threads
from the load, one hog from the start, a 60 s budget:

    python benchmarks/budget_under_load.py --budgets 60 --hogs 1 --hog-at 0 --tree ../main --tree .
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter
from lmlab.core.config import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir


def train(config: str, run: Path, budget: float, tree: str, hog_at: float | None, hogs: int) -> dict:
    """One budgeted run in its own process, with a CPU hog from `hog_at` seconds after its start; its figures."""
    env = {**os.environ, "PYTHONPATH": tree} if tree else dict(os.environ)
    command = [sys.executable, "-P", "-m", "lmlab", "train", config, "--run", str(run), "--device", "cpu",
               "--budget", f"{budget:g}s"]
    spinning: list[subprocess.Popen] = []
    with LoadMeter() as meter:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            if hog_at is not None and not spinning and time.perf_counter() - started >= hog_at:
                spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
            time.sleep(0.01)
        wall = time.perf_counter() - started
        for hog in spinning:
            hog.kill()
            hog.wait()
    if proc.returncode:
        raise SystemExit(f"training {run} failed:\n{proc.stdout.read()}")
    events = RunDir(run).events()
    cfg = RunDir(run).config().train
    trains = [e for e in events if e["event"] == "train"]
    plans = [e for e in events if e["event"] == "budget"]
    evals = [e for e in events if e["event"] == "eval"]
    threads = " ".join(f"{e['threads']}@{e['step']}" for e in events if e["event"] == "threads") or "-"
    last_lr = trains[-1]["lr"] / cfg.learning_rate if trains else float("nan")  # none: start-up took the budget
    return {"wall": wall, "steps": events[-1]["step"], "plans": len(plans), "lr": last_lr,
            "val": evals[-1]["val_loss"] if evals else float("nan"), "threads": threads, "load": meter.load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="30,60,120", help="comma-separated seconds")
    parser.add_argument("--hog-at", type=float, default=1 / 3, help="when the hog starts, as a share of the budget")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="spinning processes")
    parser.add_argument("--config", default="configs/shakespeare-char-speedrun-cpu.toml")
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(args.config)).data.dataset).parent)
    budgets = [float(b) for b in args.budgets.split(",")]
    trees = args.tree or [""]
    cases = [(b, hog, tree) for b in budgets for hog in (False, True) for tree in trees]
    table = Table(title=f"{args.config} with --budget, quiet and with {args.hogs} CPU hogs from {args.hog_at:.0%} of "
                        "the budget (wall: process start to exit)")
    for column in ("tree", "budget", "hog", "wall", "vs budget", "steps", "plans", "last LR / peak", "val",
                   "threads", "others' CPU"):
        table.add_column(column, justify="left" if column == "tree" else "right")
    progress = ItemProgress(console, len(cases))
    with tempfile.TemporaryDirectory(dir=".") as runs:
        for i, (budget, hog, tree) in enumerate(cases, 1):
            progress.start(f"budget {budget:g} s, {'hog' if hog else 'quiet'}{', tree ' + tree if tree else ''}")
            r = train(args.config, Path(runs) / f"run{i}", budget, tree, args.hog_at * budget if hog else None,
                      args.hogs)
            others = "-" if r["load"].others is None else f"{100 * r['load'].others:.0f}%"
            console.print(f"    wall {r['wall']:.1f} s ({100 * (r['wall'] / budget - 1):+.1f}%), {r['steps']} steps, "
                          f"{r['plans']} plans, val {r['val']:.4f}", highlight=False)
            table.add_row(tree or "installed", f"{budget:g} s", "yes" if hog else "no", f"{r['wall']:.1f} s",
                          f"{100 * (r['wall'] / budget - 1):+.1f}%", f"{r['steps']:,}", str(r["plans"]),
                          f"{r['lr']:.3f}", f"{r['val']:.4f}", r["threads"], others)
    console.print(table)


if __name__ == "__main__":
    main()
