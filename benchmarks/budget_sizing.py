"""How close `--size auto` gets to the best fixed shape of its family in a time budget, and how well it predicts.

    python benchmarks/budget_sizing.py [--preset configs/shakespeare-char-modern-cpu.toml] [--budgets 60,300]
        [--threads 2,1] [--depths 1,2,3,4,5,6] [--lr-factors 0.5,1,2] [--no-demo] [--out DIR]

Prepares the preset's dataset if needed (a Shakespeare char or word dataset), then, for each budget and each
thread count (train.threads: one thread of two cores is a machine half as fast), trains in its own process as a
user does (`python -m lmlab train PRESET --budget Ns ...`, start-up included):
- the automatic choice, `--size auto` (its prediction made before it trained, from the fit beside the preset);
- each of --depths of the family, `--size D`, at each of --lr-factors × the LR the fit's rule gives it (a small
  search; the best val is kept);
- the preset as it is (its own shape and LR: today's demo, for the demo preset), unless --no-demo.
Prints, per budget and thread count, a row per run: shape, params, tokens seen, tokens per parameter, val reached
(the run's best val estimate, train.eval_iters batches), the val the fit predicts (for the automatic choice, its
prediction before training; for the others, the fit at the tokens they saw), the LR, wall time; then one line: the
automatic choice against the best fixed shape (target: within 2%), against the preset as it is, and its prediction
against the val it reached (target: within 3%). The host's fp32 matmul peak is said first.

The whole grid (2 budgets x 2 thread counts x (1 + 6 x 3 + 1) runs) takes about 4 hours; run it on a quiet
machine. A small run to see it work: --budgets 20 --threads 1 --depths 1,2 --lr-factors 1 --no-demo.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from lmlab.analysis.runs import summarize
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.config_toml import load_config
from lmlab.core.peak import peak_flops
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.experiments.family import read_fit, refit_command
from lmlab.run.rundir import RunDir


def train(preset: str, run: Path, budget: float, threads: int, args: list[str]) -> dict:
    """One budgeted run in its own process; what it reached."""
    command = [sys.executable, "-P", "-m", "lmlab", "train", preset, "--run", str(run), "--device", "cpu",
               "--budget", f"{budget:g}s", "--set", f"train.threads={threads}", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"training {run} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    s, cfg = summarize(run), RunDir(run).config()
    sized = [e for e in RunDir(run).events() if e["event"] == "sizing"]
    return {"shape": f"{cfg.model.n_layer}L/{cfg.model.n_embd}", "params": s.params, "tokens": s.tokens,
            "val": s.best_val_loss, "lr": cfg.train.learning_rate, "wall": wall,
            "predicted": sized[0]["predicted_val"] if sized else None}


def cell(preset: str, budget: float, threads: int, args: argparse.Namespace, folder: Path,
         progress: ItemProgress) -> list[dict]:
    """The runs of one budget and thread count: auto, each depth's best LR, the preset as it is."""
    cfg, fit = load_config(Path(preset)), read_fit(Path(preset))
    tag = f"{budget:g}s-{threads}t"
    progress.start(f"{tag}: --size auto")
    rows = [{**train(preset, folder / f"{tag}-auto", budget, threads, ["--size", "auto"]), "run": "auto"}]
    for depth in args.depths:
        tried = []
        for factor in args.lr_factors:
            progress.start(f"{tag}: --size {depth}, LR x{factor:g}")
            lrs = [f"train.learning_rate={cfg.train.learning_rate * factor:.3g}",
                   f"train.min_lr={cfg.train.min_lr * factor:.3g}"]
            tried.append(train(preset, folder / f"{tag}-d{depth}-x{factor:g}", budget, threads,
                               ["--size", str(depth), *(a for s in lrs for a in ("--set", s))]))
        best = min(tried, key=lambda r: r["val"])
        rows.append({**best, "run": f"depth {depth}", "predicted": fit.predict(best["params"], best["tokens"]),
                     "searched": len(tried)})
    if args.demo:
        progress.start(f"{tag}: the preset as it is")
        fixed = train(preset, folder / f"{tag}-preset", budget, threads, [])
        rows.append({**fixed, "run": "preset", "predicted": fit.predict(fixed["params"], fixed["tokens"])})
    return rows


def table(preset: str, budget: float, threads: int, rows: list[dict]) -> Table:
    t = Table(title=f"{preset}, --budget {budget:g}s on {threads} thread{'s' * (threads > 1)}")
    for column in ("run", "shape", "params", "tokens seen", "tokens/param", "val reached", "predicted val", "LR",
                   "wall"):
        t.add_column(column, justify="left" if column in ("run", "shape") else "right")
    for r in rows:
        predicted = "-" if r["predicted"] is None else f"{r['predicted']:.4f}"
        t.add_row(r["run"], r["shape"], f"{r['params']:,}", f"{r['tokens']:,}", f"{r['tokens'] / r['params']:.2f}",
                  f"{r['val']:.4f}", predicted, f"{r['lr']:.3g}", f"{r['wall']:.1f} s")
    return t


def verdict(rows: list[dict]) -> str:
    auto, fixed = rows[0], [r for r in rows if r["run"].startswith("depth")]
    said = []
    if fixed:
        best = min(fixed, key=lambda r: r["val"])
        said.append(f"auto {auto['val']:.4f} against the best fixed shape's {best['val']:.4f} ({best['run']}): "
                    f"{100 * (auto['val'] / best['val'] - 1):+.2f}% (target within 2%)")
    preset = [r for r in rows if r["run"] == "preset"]
    if preset:
        said.append(f"against the preset as it is ({preset[0]['shape']}): {preset[0]['val']:.4f}, "
                    f"{100 * (auto['val'] / preset[0]['val'] - 1):+.2f}%")
    if auto["predicted"] is not None:
        said.append(f"auto predicted {auto['predicted']:.4f}, {100 * (auto['predicted'] / auto['val'] - 1):+.2f}% "
                    "of what it reached (target within 3%)")
    return "; ".join(said)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--budgets", default="60,300", help="comma-separated seconds")
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts (train.threads)")
    parser.add_argument("--depths", default="1,2,3,4,5,6", help="the fixed depths of the family to train")
    parser.add_argument("--lr-factors", default="0.5,1,2", help="each depth's LR search: x the fit's LR for it")
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="leave out the preset as it is")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder, deleted after)")
    args = parser.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    args.lr_factors = [float(f) for f in args.lr_factors.split(",")]
    cfg = load_config(Path(args.preset))
    if read_fit(Path(args.preset)) is None:
        raise SystemExit(f"{args.preset} has no fit beside it: `{refit_command(args.preset)}` first.")
    dataset = Path(cfg.data.dataset)
    prepare(["shakespeare"], dataset.name.removeprefix("shakespeare-").replace("word", "word:"),
            out_dir=dataset.parent)
    peak = peak_flops(torch.device("cpu"), torch.float32)
    console.print(f"host: {peak.standing()}", highlight=False)
    budgets, threads = [float(b) for b in args.budgets.split(",")], [int(t) for t in args.threads.split(",")]
    runs_per_cell = 1 + len(args.depths) * len(args.lr_factors) + args.demo
    progress = ItemProgress(console, len(budgets) * len(threads) * runs_per_cell)
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        folder = Path(args.out or scratch)
        for budget in budgets:
            for count in threads:
                rows = cell(args.preset, budget, count, args, folder, progress)
                console.print(table(args.preset, budget, count, rows))
                console.print(verdict(rows), highlight=False)


if __name__ == "__main__":
    main()
