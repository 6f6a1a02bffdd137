"""The best model the CPU trains in N seconds: the speedrun preset at several budgets, the demo preset at 300 s.

    python benchmarks/cpu_speedrun.py [--budgets 30,60,120,300] [--demo-budget 300] [--repeats 3] [--peer] [--auto]

Prepares data/shakespeare-char if needed, then runs `lmlab train CONFIG --budget Ns` as a user does, one process
per run, for configs/shakespeare-char-speedrun-cpu.toml at each of --budgets and the demo preset at
--demo-budget (0 leaves it out), and with --auto both presets sized to each of --budgets (`--size auto`, as
`make demo` trains the demo preset: the depths of the preset's family timed here, the fit beside it choosing); the
runs take turns within each of --repeats rounds, so a change in the machine's load hits all of them alike. Each
run's wall time is the process's, start-up and exit included. After a run (outside its time) its final weights are
scored on the whole val split (`lmlab eval`).

--peer also trains nanoGPT's CPU recipe with lmlab's own code (4 layers, 4 heads, 128 wide, GPT-2 blocks without
biases, block 64, batch 12, 2,000 iterations, AdamW at LR 1e-3 with 100 warmup steps and a cosine to 1e-4,
beta2 0.99, weight decay 0.1, dropout 0, fp32,
20 eval batches every 250 steps, as nanoGPT's config) and reports its wall time, its final val loss and when it
first reached val 1.885, from its process's start, and the shortest budget of each config that ended at or below
that val, as a share of that time (the issue's target: at most 1/5).

Prints one row per config and budget, the median over the repeats (and the range of the val losses): wall time
and its ratio to the budget, steps, tokens/s and MFU of the training steps, the run's own final val estimate
(train.eval_iters batches), the full-split val loss, and the issue's target for that budget.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.evals.evaluate import evaluate_run
from lmlab.run.rundir import RunDir

SPEEDRUN, DEMO = "configs/shakespeare-char-speedrun-cpu.toml", "configs/shakespeare-char-modern-cpu.toml"
TARGETS = {30: 1.885, 120: 1.60, 300: 1.48}  # issue 17: val loss within the budget, process start to end
PEER = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.dropout=0.0",
        "model.bias=false", "model.pos_emb=learned", "model.norm=layernorm", "model.mlp=gelu", "model.qk_norm=false",
        "train.batch_size=12", "train.max_iters=2000", "train.optimizer=adamw", "train.learning_rate=1e-3",
        "train.min_lr=1e-4", "train.warmup_iters=100", "train.beta2=0.99", "train.weight_decay=0.1",
        "train.dtype=float32", "train.eval_interval=250", "train.eval_iters=20", "train.checkpoint_interval=2000"]
NANOGPT_LOSS = 1.885


def train(config: str, run: Path, args: list[str]) -> float:
    """Run `lmlab train` in its own process; its wall time (and a warning when the machine was busy meanwhile)."""
    with LoadMeter() as meter:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-P", "-m", "lmlab", "train", config, "--run", str(run), "--device",
                               "cpu", *args], capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"training {run} failed:\n{done.stdout}\n{done.stderr}")
    warning = busy_warning(str(run), meter.load, "its steps and val read worse than the machine's")
    if warning:
        console.print(warning, style="yellow", markup=False)
    return wall


def measure(config: str, budget: int, run: Path, size: list[str]) -> dict[str, float]:
    wall = train(config, run, ["--budget", f"{budget}s", *size])
    events = RunDir(run).events()
    trains = [e for e in events if e["event"] == "train"]
    end = next(e for e in events if e["event"] == "end")
    final = [e for e in events if e["event"] == "eval"][-1]
    full = evaluate_run(RunDir(run).load("latest", "cpu"))
    return {"wall": wall, "steps": end["step"], "tokens": end["tokens"],
            "rate": statistics.mean(e["tokens_per_sec"] for e in trains),
            "mfu": statistics.mean(m) if (m := [e["mfu"] for e in trains if e["mfu"] is not None]) else None,
            "estimate": final["val_loss"], "full": full["loss"]}


def peer(run: Path) -> dict[str, float]:
    """nanoGPT's recipe: the first eval at or below its final loss, timed from the process's start."""
    wall = train(SPEEDRUN, run, [arg for s in PEER for arg in ("--set", s)] + ["--set", "train.budget_seconds=0"])
    events = RunDir(run).events()
    end = next(e for e in events if e["event"] == "end")
    startup = wall - end["elapsed"]  # the process's time outside its training clock
    hit = next((e for e in events if e["event"] == "eval" and e["val_loss"] <= NANOGPT_LOSS), None)
    return {"wall": wall, "reached": startup + hit["elapsed"] if hit else float("nan"),
            "best": end["best_val_loss"], "rate": statistics.mean(e["tokens_per_sec"] for e in events
                                                                  if e["event"] == "train")}


def median_range(values: list[float], spec: str = ".3f") -> str:
    text = format(statistics.median(values), spec)
    return text if len(values) == 1 else f"{text} ({min(values):{spec}}-{max(values):{spec}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="30,60,120,300",
                        help="seconds, comma-separated (the speedrun preset, and --auto)")
    parser.add_argument("--demo-budget", type=int, default=300, help="seconds for the demo preset; 0: skip it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also train nanoGPT's recipe with lmlab's code")
    parser.add_argument("--auto", action="store_true", help="also train the speedrun and demo presets with --size "
                        "auto at each of --budgets")
    parser.add_argument("--out", default=f"runs/cpu-speedrun-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(SPEEDRUN)).data.dataset).parent)
    budgets = [int(b) for b in args.budgets.split(",")]
    jobs = ([(SPEEDRUN, b, "") for b in budgets] + ([(DEMO, args.demo_budget, "")] if args.demo_budget else []) +
            ([(preset, b, "auto") for preset in (SPEEDRUN, DEMO) for b in budgets] if args.auto else []))
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {job: [] for job in jobs}
    peers, progress = [], ItemProgress(console, args.repeats * (len(jobs) + args.peer))
    for round_ in range(args.repeats):
        for config, budget, size in jobs:
            run = Path(args.out) / f"{Path(config).stem}{'-' * bool(size)}{size}-{budget}s-{round_}"
            progress.start(f"{name(config, size)} with --budget {budget}s, round {round_ + 1}")
            results[(config, budget, size)].append(measure(config, budget, run, ["--size", size] if size else []))
            console.print(f"{run}: {results[(config, budget, size)][-1]}")
        if args.peer:
            progress.start(f"nanoGPT's recipe, round {round_ + 1}")
            peers.append(peer(Path(args.out) / f"nanogpt-recipe-{round_}"))
            console.print(f"nanoGPT recipe: {peers[-1]}")

    table = Table(title=f"`lmlab train CONFIG --budget N` on the CPU, median (range) of {args.repeats} ({args.out})")
    for column in ("config", "budget", "wall s", "wall / budget", "steps", "tokens/s", "MFU", "val (run's estimate)",
                   "val (whole split)", "target"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for (config, budget, size), rows in results.items():
        target = TARGETS.get(budget)
        met = statistics.median(r["full"] for r in rows) <= target if target else None
        table.add_row(name(config, size), f"{budget} s", median_range([r["wall"] for r in rows], ".1f"),
                      f"{statistics.median(r['wall'] for r in rows) / budget:.3f}",
                      f"{statistics.median(r['steps'] for r in rows):.0f}",
                      f"{statistics.median(r['rate'] for r in rows):,.0f}",
                      "-" if any(r["mfu"] is None for r in rows) else
                      f"{100 * statistics.median(r['mfu'] for r in rows):.1f}%",
                      median_range([r["estimate"] for r in rows]), median_range([r["full"] for r in rows]),
                      "-" if target is None else f"<= {target} {'met' if met else 'MISSED'}")
    console.print(table)
    if peers:
        console.print(f"nanoGPT's recipe trained by lmlab: val {NANOGPT_LOSS} first reached "
                      f"{median_range([p['reached'] for p in peers], '.1f')} s after its process started; final "
                      f"val {median_range([p['best'] for p in peers])}, "
                      f"{statistics.median(p['rate'] for p in peers):,.0f}"
                      f" tokens/s, {median_range([p['wall'] for p in peers], '.1f')} s in all.")
        reached = statistics.median(p["reached"] for p in peers)
        for config, size in dict.fromkeys((c, s) for c, _, s in jobs):
            hits = [b for c, b, s in jobs if (c, s) == (config, size)
                    and statistics.median(r["full"] for r in results[(c, b, s)]) <= NANOGPT_LOSS]
            console.print(f"{name(config, size)}: " + (f"val {NANOGPT_LOSS} within a {min(hits)} s budget, "
                          f"{min(hits) / reached:.2f} of the recipe's time (target: at most 0.20)" if hits else
                          f"no budget tried ended at or below val {NANOGPT_LOSS}"), highlight=False)


def name(config: str, size: str) -> str:
    return Path(config).stem + (f" --size {size}" if size else "")


if __name__ == "__main__":
    main()
