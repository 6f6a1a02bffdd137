"""`lmlab sweep`: every combination of a few settings under one budget, then the comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands.common import add_device, add_size, console, count, destination, print_table, within
from lmlab.core.config import MAX_BUDGET_SECONDS


def cmd_sweep(args: argparse.Namespace) -> None:
    from lmlab.core.busy import LoadMeter

    window = LoadMeter().start()  # the load while PyTorch loads: what the first trial's thread count is told by
    from lmlab.api.compare import Comparison
    from lmlab.experiments.sweep import run_sweep

    result = run_sweep(Path(args.config), args.set, args.name, Path(args.dir), args.budget_tokens or 0,
                       args.budget_seconds or 0.0, args.device, console, args.size, window)
    evaluated = [s for s in result.summaries if s.best_val_loss is not None and s.params]
    if evaluated:
        compared = Comparison(evaluated)
        print_table(compared.title, compared.columns, compared.rows)
    if result.stopped_by:
        console.print(f"sweep stopped by {result.stopped_by}; run the same command again to continue it.")
    for line in result.verdict():
        console.print(line, highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train every combination of a few settings under one budget, then compare")
    p.add_argument("config", help="TOML preset the trials start from")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep, comma-separated (one value: a setting for every trial); repeatable")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=count(), help="training tokens per trial (sets train.max_iters)")
    budget.add_argument("--budget-seconds", type=within(0, MAX_BUDGET_SECONDS, above=True),
                        help="wall-clock seconds per trial, evals included, at most 366 days (sets "
                        "train.budget_seconds: the LR schedule ends with the budget)")
    add_size(p, "--budget-seconds")
    p.add_argument("--name", help="sweep name: trials go to DIR/NAME/<trial> (default: <config name>-sweep)")
    p.add_argument("--dir", default="runs", type=destination("--dir"),
                   help="where the sweep folder goes (default: runs)")
    add_device(p)
