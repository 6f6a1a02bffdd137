"""`lmlab log RUN`: every evaluation of one run (`lmlab.Run.history`), as a table, JSON or CSV (the `runs` command
lists many runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmlab.commands.common import console, destination, print_table
from lmlab.core.errors import UserError


def cmd_log(args: argparse.Namespace) -> None:
    from lmlab.analysis.history import EVAL_COLUMNS, to_csv
    from lmlab.api.run import Run

    run = Run(args.run, console)  # a folder that is no run is refused as every command refuses it
    rows = run.history
    if args.plot:
        from lmlab.analysis.plots import save

        written = save(run.plot("grad_norm"), Path(args.plot))
        print(f"gradient norm and learning rate by step: {written}", file=sys.stderr)  # stdout: the rows alone
    if args.json:
        print(json.dumps({"run": str(run.path), "evaluations": rows}, indent=1))
        return
    if args.csv:
        sys.stdout.write(to_csv(rows))
        return
    if not rows:
        raise UserError(f"{run.path} has no evaluation yet ({run.kind}); a trained run logs one every "
                        "train.eval_interval, a fine-tune one an epoch.")
    print_table(f"Evaluations of {run.path}", EVAL_COLUMNS, rows, args.wide)
    console.print("train (steps): the mean loss of the steps since the evaluation before; train (eval): the train "
                  "split scored as val is", highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("log", help="every evaluation of a run: step, epoch, tokens, elapsed, train and val loss, "
                       "best, val perplexity and accuracy")
    p.add_argument("run", metavar="RUN", help="a run dir")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the evaluations as JSON instead of a table")
    shape.add_argument("--csv", action="store_true", help="print the evaluations as CSV (a header, a row each)")
    p.add_argument("--wide", action="store_true", help="every column (the val perplexity and next-token accuracy, "
                   "the gradient norm since the evaluation before), however wide the table gets")
    p.add_argument("--plot", metavar="PNG", type=destination("--plot", "file"),
                   help="also draw the gradient norm of each logged step, with the learning rate, to this PNG")
