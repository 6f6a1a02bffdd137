"""The demo's recipe, one lever at a time: each lever's values swept at several budgets and seeds, sized as
`make demo` sizes, judged on the final score.

    python benchmarks/recipe_levers.py LEVER=SECTION.KEY=BASE,V2,... [...] [--budgets 60,120,300] [--seeds 1,2]
        [--set SECTION.KEY=VALUE ...] [--config configs/shakespeare-char-modern-cpu.toml] [--dir runs/levers]

e.g. `opt=train.optimizer=adamw,muon`, or `muon-lr=train.learning_rate=2e-3,4e-3 --set train.optimizer=muon` (a
--set applies to every trial of every lever). For each lever and budget it runs `lmlab sweep CONFIG --size auto
--budget-seconds B --set SECTION.KEY=... --set train.seed=...` (one process, the trials in turn; a sweep run again
skips its finished trials, so an interrupted benchmark continues where it stopped), so each value is trained at the
size it would be trained at, and each trial ends on its final score (its last checkpoint on the val split). The
first value is the baseline.

Prints a table per lever: each value's mean final val at each budget with the seeds' spread (max - min), its change
against the baseline, and the verdict the issue asks for: kept where it wins at the longest budget by more than the
spread of both and does not lose at the shortest.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from lmlab.analysis.runs import summarize
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.progress import ItemProgress
from lmlab.experiments.sweep import parse_grid


def sweep(config: str, lever: str, setting: str, budget: int, seeds: str, root: Path, fixed: list[str]) -> Path:
    """`lmlab sweep` of one lever at one budget, its output kept beside it; the sweep's folder."""
    name = f"{lever}-{budget}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.log", "a") as log:
        done = subprocess.run([sys.executable, "-m", "lmlab", "sweep", config, "--size", "auto", "--budget-seconds",
                               str(budget), "--set", setting, "--set", f"train.seed={seeds}",
                               *(arg for item in fixed for arg in ("--set", item)), "--name", name, "--dir", str(root),
                               "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"the sweep {name} failed: see {root / f'{name}.log'}")
    return root / name


def finals(folder: Path, key: str, values: list[str], seeds: list[str]) -> dict[str, list[float]]:
    """Each value's final scores, one per seed, from the sweep's trial folders."""
    field = key.partition(".")[2]
    scores: dict[str, list[float]] = {}
    for value in values:
        for seed in seeds:
            run = summarize(folder / f"{field}={value},seed={seed}")
            if run.final_val_loss is None:
                raise SystemExit(f"{run.path} has no final score ({run.status}): run the benchmark again to finish it")
            scores.setdefault(value, []).append(run.final_val_loss)
    return scores


def verdict(base: dict[int, list[float]], arm: dict[int, list[float]], budgets: list[int]) -> str:
    """Kept where the arm wins at the longest budget by more than either's seed spread, and does not lose at the
    shortest by more than that."""
    def spread(xs: list[float]) -> float:
        return max(xs) - min(xs)

    long, short = budgets[-1], budgets[0]
    margin = max(spread(base[long]), spread(arm[long]))
    win = statistics.mean(base[long]) - statistics.mean(arm[long])
    loss = statistics.mean(arm[short]) - statistics.mean(base[short])
    if win <= margin:
        return f"not kept: {-win:+.4f} at {long} s, not lower by more than the seeds' spread {margin:.4f}"
    if loss > max(spread(base[short]), spread(arm[short])):
        return f"not kept: wins {win:.4f} at {long} s but loses {loss:.4f} at {short} s"
    return f"kept: {win:.4f} lower at {long} s (spread {margin:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("levers", nargs="+", metavar="LEVER=SECTION.KEY=BASE,V2,...")
    parser.add_argument("--budgets", default="60,120,300", help="seconds, comma-separated (default: 60,120,300)")
    parser.add_argument("--seeds", default="1,2", help="train.seed values, comma-separated (default: 1,2)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of every trial (repeatable)")
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml", help="the preset (make demo's)")
    parser.add_argument("--dir", type=Path, default=Path("runs/levers"), help="where the sweeps go")
    args = parser.parse_args()
    budgets, seeds = sorted(int(b) for b in args.budgets.split(",")), args.seeds.split(",")
    levers = []
    for spec in args.levers:
        lever, _, setting = spec.partition("=")
        (key, values), = parse_grid([setting])
        if len(values) < 2:
            raise SystemExit(f"{spec}: give the baseline and at least one other value (opt=train.optimizer=adamw,muon)")
        levers.append((lever, setting, key, values))

    progress, results = ItemProgress(console, len(levers) * len(budgets)), {}
    for lever, setting, key, values in levers:
        for budget in budgets:
            progress.start(f"{lever} ({setting}) at {budget} s, seeds {args.seeds}")
            folder = sweep(args.config, lever, setting, budget, args.seeds, args.dir, args.set)
            results[(lever, budget)] = finals(folder, key, values, seeds)

    for lever, _, key, values in levers:
        fixed = f", with {' '.join(args.set)}" if args.set else ""
        table = Table(title=f"{lever}: {key}{fixed}, final val (mean of seeds {args.seeds}; spread), change "
                      f"against {values[0]}")
        table.add_column(key, justify="left")
        for budget in budgets:
            table.add_column(f"{budget} s", justify="right")
        table.add_column("verdict", justify="left")
        base = {b: results[(lever, b)][values[0]] for b in budgets}
        for value in values:
            arm = {b: results[(lever, b)][value] for b in budgets}
            cells = [f"{statistics.mean(arm[b]):.4f} ({max(arm[b]) - min(arm[b]):.4f})" +
                     ("" if value == values[0] else f" {statistics.mean(arm[b]) - statistics.mean(base[b]):+.4f}")
                     for b in budgets]
            table.add_row(value, *cells, "baseline" if value == values[0] else verdict(base, arm, budgets))
        console.print(table)


if __name__ == "__main__":
    main()
