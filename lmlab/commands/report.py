"""`lmlab report`: the write-up of one or several runs as Markdown with PNGs, and as one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands.common import add_checkpoint, add_device, add_sampling, console, destination, samplings, ticking
from lmlab.core.errors import UserError


def default_folder(runs: list[str]) -> Path:
    """RUN/report for one run; reports/A-vs-B(-vs-C) for several (the first and a count past three)."""
    names = [Path(r).resolve().name for r in runs]
    if len(names) == 1:
        return Path(runs[0]) / "report"
    return Path("reports") / ("-vs-".join(names) if len(names) <= 3 else f"{names[0]}-and-{len(names) - 1}-more")


def cmd_report(args: argparse.Namespace) -> None:
    from lmlab.writeup.grid import read_prompts
    from lmlab.writeup.report import Options, build_report

    params = samplings(args)
    if args.prompts and args.prompt:
        raise UserError("--prompt and --prompts both name what the samples continue; put the prompt in the file.")
    grid = None
    if args.prompts or len(params) > 1 or args.chat:
        prompts = read_prompts(Path(args.prompts)) if args.prompts else [args.prompt]
        grid = (prompts, [p.temperature for p in params])
    out = Path(args.out) if args.out else default_folder(args.runs)
    options = Options(args.prompt, params[0], args.device, args.checkpoint, not args.no_eval,
                      lambda line: console.print(line, highlight=False), ticking, grid, args.chat)
    report = build_report([Path(r) for r in args.runs], out, options)
    console.print(f"report: {report.markdown} (with {len(report.images)} PNGs beside it)")
    console.print(f"one page: {report.html}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write up runs: machine, data, model, training, evaluation, Chinchilla, "
                       "samples, comparison (Markdown + PNGs, and one HTML page)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs; with several, the first is the base of the "
                   "comparison")
    p.add_argument("--out", metavar="DIR", type=destination("--out", "report"), help="folder for report.md, its PNGs "
                   "and report.html (default: RUN/report for one run, reports/A-vs-B for several)")
    p.add_argument("--prompt", default="", help="what the samples continue (default: the start of a document)")
    p.add_argument("--prompts", metavar="FILE", help="the samples as a grid: every run continuing every prompt of "
                   "FILE (one per line, \\n for a line break, or a JSON list) at every --temperature")
    p.add_argument("--chat", action="store_true", help="the samples as a grid in which a run with a chat template "
                   "(an imported instruct model) or a fine-tune's prompt format is asked each prompt as a user's "
                   "message, and the others continue it")
    add_sampling(p, several=True, max_new_tokens=300)
    add_checkpoint(p, "the checkpoint reported on (evaluated, sampled, its kept task and judge scores)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the val split: report kept evaluations "
                   "only (a report evaluates each run's checkpoint once and keeps the result)")
    add_device(p)
