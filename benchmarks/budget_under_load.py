"""Whether `lmlab train --budget` ends when its budget does when the machine gets busy mid-run, for every preset.

    python benchmarks/budget_under_load.py [--budgets 30,60,120,300] [--hog-at 0.33] [--hogs 1,2] [--lull] [--plot PNG]
        [--configs PRESET,...] [--auto configs/shakespeare-char-modern-cpu.toml] [--tree PATH ...]

Prepares the Shakespeare datasets the presets need, then for each config and budget trains as a user does
(`python -m lmlab train CONFIG --budget Ns`, one process each): on a quiet machine, and with each of --hogs
processes spinning on the CPU (`python -c "while True: pass"`) started --hog-at of the budget after the command and
killed once it exits; with --lull, the hogs spin from the start, stop at 30% of the budget and spin again from 45%
(a lull, then the load back, which a run's decay must follow to end at min_lr). --auto adds that preset with
`--size auto` (its sizes timed within the budget). The configs are every preset whose dataset is Shakespeare's
(configs/gpt2-small.toml needs OpenWebText; the GPU recipe,
configs/shakespeare-char.toml, takes seconds a step on 2 cores). Wall time is the process's, start to exit. Each
--tree is an lmlab source tree put first on PYTHONPATH (`python -P`), so two versions compare in one sitting (they
take turns). The machine must be otherwise idle: run it under the heavy lock.

Prints a row per tree, config, budget and load: wall time against the budget (the target: within 5%), steps, the
plans made, the LR at the last step as a share of the peak, the run's final val estimate, the batches each of its
evaluations scored (fewer than train.eval_iters where the budget could not hold them), the threads it changed to
and at which step (`threads` events: 1@0 is one thread from the start), and the machine's load while it ran
(other processes' share of the cores, hogs excluded). The whole grid (6 configs x 4 budgets x 3 loads) takes
about 2.5 hours. Before and after a change, one hog from the start, a 60 s budget of the speedrun preset:

    python benchmarks/budget_under_load.py --budgets 60 --hogs 1 --hog-at 0 \
        --configs configs/shakespeare-char-speedrun-cpu.toml --auto "" --tree ../main --tree .
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
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir

PRESETS = ("configs/shakespeare-char-speedrun-cpu.toml", "configs/shakespeare-char-modern-cpu.toml",
           "configs/shakespeare-char-cpu.toml", "configs/shakespeare-word-cpu.toml", "configs/shakespeare-char.toml")


def train(config: str, run: Path, budget: float, tree: str, windows: list[tuple[float, float]], hogs: int,
          size: list[str]) -> dict:
    """One budgeted run in its own process, with `hogs` CPU hogs spinning in each (from, to) window of seconds after
    its start; its figures."""
    env = {**os.environ, "PYTHONPATH": tree} if tree else dict(os.environ)
    command = [sys.executable, "-P", "-m", "lmlab", "train", config, "--run", str(run), "--device", "cpu",
               "--budget", f"{budget:g}s", *size]
    spinning: list[subprocess.Popen] = []

    def stop() -> None:
        for hog in spinning:
            hog.kill()
            hog.wait()
        spinning.clear()

    with LoadMeter() as meter:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            now = time.perf_counter() - started
            wanted = hogs and any(start <= now < end for start, end in windows)
            if wanted and not spinning:
                spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
            elif spinning and not wanted:
                stop()
            time.sleep(0.01)
        wall = time.perf_counter() - started
        stop()
    if proc.returncode:
        raise SystemExit(f"training {run} failed:\n{proc.stdout.read()}")
    events = RunDir(run).events()
    cfg = RunDir(run).config().train
    plans = [e for e in events if e["event"] == "budget"]
    evals = [e for e in events if e["event"] == "eval"]
    threads = " ".join(f"{e['threads']}@{e['step']}" for e in events if e["event"] == "threads") or "-"
    end, trains = events[-1], [e for e in events if e["event"] == "train"]
    last_lr = end.get("lr", trains[-1]["lr"] if trains else float("nan"))  # an older tree's: its last train line's
    return {"wall": wall, "steps": end["step"], "plans": len(plans), "lr": last_lr / cfg.learning_rate,
            "curve": [(e["elapsed"], e["lr"]) for e in trains],
            "val": evals[-1]["val_loss"] if evals else float("nan"), "threads": threads, "load": meter.load,
            "eval_iters": plans[0]["eval_iters"] if plans else cfg.eval_iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="30,60,120,300", help="comma-separated seconds")
    parser.add_argument("--hog-at", type=float, default=1 / 3, help="when the hogs start, as a share of the budget")
    parser.add_argument("--hogs", default="1,2", help="comma-separated counts of spinning processes, each a load")
    parser.add_argument("--lull", action="store_true", help="hogs from the start, none from 30%% to 45%% of the "
                        "budget, then again to the end")
    parser.add_argument("--configs", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--auto", default="configs/shakespeare-char-modern-cpu.toml", help="a preset also trained "
                        "with --size auto (\"\": none)")
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    parser.add_argument("--plot", type=Path, help="a PNG of every run's LR against its seconds of training")
    args = parser.parse_args()
    configs = [(c, []) for c in args.configs.split(",") if c] + [(args.auto, ["--size", "auto"])] * bool(args.auto)
    for dataset in {Path(load_config(Path(c)).data.dataset) for c, _ in configs}:
        prepare(["shakespeare"], dataset.name.removeprefix("shakespeare-").replace("word", "word:"),
                out_dir=dataset.parent)
    budgets = [float(b) for b in args.budgets.split(",")]
    loads = [0, *(int(h) for h in args.hogs.split(","))]
    trees = args.tree or [""]
    cases = [(c, b, hogs, tree) for c in configs for b in budgets for hogs in loads for tree in trees]
    when = ("through a lull (none from 30% to 45% of the budget)" if args.lull
            else f"from {args.hog_at:.0%} of the budget")
    table = Table(title=f"--budget, quiet and with CPU hogs {when} (wall: process start to exit)")
    for column in ("tree", "config", "budget", "hogs", "wall", "vs budget", "steps", "plans", "last LR / peak", "val",
                   "eval batches", "threads", "others' CPU"):
        table.add_column(column, justify="left" if column in ("tree", "config") else "right")
    progress, curves = ItemProgress(console, len(cases)), {}
    with tempfile.TemporaryDirectory(dir=".") as runs:
        for i, ((config, size), budget, hogs, tree) in enumerate(cases, 1):
            name = Path(config).stem.removeprefix("shakespeare-") + (" --size auto" if size else "")
            progress.start(f"{name}, budget {budget:g} s, {hogs} hogs{', tree ' + tree if tree else ''}")
            windows = ([(0.0, 0.3 * budget), (0.45 * budget, float("inf"))] if args.lull else
                       [(args.hog_at * budget, float("inf"))])
            r = train(config, Path(runs) / f"run{i}", budget, tree, windows, hogs, size)
            others = "-" if r["load"].others is None else f"{100 * r['load'].others:.0f}%"
            curves[f"{tree or 'installed'}: {name}, {budget:g} s, {hogs} hogs ({r['steps']} steps)"] = r["curve"]
            console.print(f"    wall {r['wall']:.1f} s ({100 * (r['wall'] / budget - 1):+.1f}%), {r['steps']} steps, "
                          f"{r['plans']} plans, val {r['val']:.4f}", highlight=False)
            table.add_row(tree or "installed", name, f"{budget:g} s", str(hogs), f"{r['wall']:.1f} s",
                          f"{100 * (r['wall'] / budget - 1):+.1f}%", f"{r['steps']:,}", str(r["plans"]),
                          f"{r['lr']:.3f}", f"{r['val']:.4f}", str(r["eval_iters"]), r["threads"], others)
    console.print(table)
    if args.plot:
        plot(curves, args.plot, when)


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, when: str) -> None:
    from lmlab.analysis.plots import pyplot

    fig, ax = pyplot().subplots(figsize=(9, 5), dpi=120)
    for label, points in curves.items():
        ax.plot(*zip(*points), label=label, marker=".", markersize=3)
    ax.set(xlabel="seconds of training (the train lines' elapsed)", ylabel="learning rate",
           title=f"The LR of budgeted runs, CPU hogs {when}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    console.print(f"LR curves: {path}")


if __name__ == "__main__":
    main()
