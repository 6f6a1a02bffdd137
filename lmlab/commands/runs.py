"""`lmlab runs`, `lmlab compare` and `lmlab scaling`: what the run folders say, side by side and as power laws."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from lmlab.commands.common import add_sampling, console, fmt, sampling
from lmlab.errors import UserError

if TYPE_CHECKING:  # the command modules import the library when a command runs, not when the CLI starts
    from lmlab.runs import RunSummary


def cmd_runs(args: argparse.Namespace) -> None:
    from lmlab.runs import find_runs, summarize

    table = Table(title=f"Runs under {args.dir}")
    columns = ("run", "status", "model", "params", "dataset", "tokenizer", "tokens", "steps", "best val",
               "bits/byte", "val-train", "wall time", "device")
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "status", "model", "dataset", "tokenizer",
                                                               "device") else "right")
    for path in find_runs(Path(args.dir)):
        s = summarize(path)
        table.add_row(str(path.relative_to(args.dir)), s.status, s.model or "-",
                      f"{s.params / 1e6:.2f}M" if s.params else "-", Path(s.dataset).name if s.dataset else "-",
                      s.tokenizer or "-", f"{s.tokens:,}",
                      f"{s.steps:,}", fmt(s.best_val_loss), fmt(s.best_bpb), fmt(s.gap, "+.4f"),
                      f"{s.elapsed:,.0f} s", s.device or "-")
    console.print(table)


def comparison_table(runs: list[RunSummary]) -> Table:
    """Runs (RunSummary objects with an evaluation) side by side, each figure relative to the first run."""
    from lmlab.scaling import chinchilla_percent

    base = runs[0]
    table = Table(title=f"Compared with {base.name}")
    rows = {
        "parameters": lambda s: f"{s.params / 1e6:.2f}M ({s.params / base.params:.2f}×)",
        "tokens seen": lambda s: f"{s.tokens:,} ({s.tokens / base.tokens:.2f}×)",
        "training compute": lambda s: f"{s.flops:.3g} FLOPs ({s.flops / base.flops:.2f}×)",
        "wall time": lambda s: f"{s.elapsed:,.0f} s ({s.elapsed / base.elapsed:.2f}×)",
        "best val loss": lambda s: f"{s.best_val_loss:.4f} ({100 * (s.best_val_loss / base.best_val_loss - 1):+.1f}%)",
        "bits per byte": lambda s: fmt(s.best_bpb),
        "tokens per parameter": lambda s: f"{s.tokens / s.params:.2f}",
        "% of Chinchilla-optimal": lambda s: f"{chinchilla_percent(s.tokens, s.params):.1f}%",
        "overfitting (val - train at best)": lambda s: fmt(s.gap, "+.4f"),
        "still falling at the end": lambda s: "yes" if s.still_falling else "no",
        "status": lambda s: s.status,
    }
    table.add_column("figure")
    for s in runs:
        table.add_column(s.name, justify="right")
    for label, cell in rows.items():
        table.add_row(label, *(cell(s) for s in runs))
    return table


def cmd_compare(args: argparse.Namespace) -> None:
    from lmlab.generate import sample
    from lmlab.plots import plot_comparison
    from lmlab.rundir import RunDir
    from lmlab.runs import summarize

    params = sampling(args)
    runs = [summarize(Path(r)) for r in args.runs]
    for s in runs:
        if s.best_val_loss is None or not s.params or not s.flops:
            raise UserError(f"{s.path} has no evaluation to compare ({s.status}); train it past one eval_interval.")
    console.print(comparison_table(runs))
    if args.plot:
        console.print(f"plot: {plot_comparison(runs, Path(args.plot), args.x, args.log)}")
    if args.prompt is not None:
        samples = Table(title=f"Samples, prompt {args.prompt!r}, {params.describe()}", show_lines=True)
        for s in runs:
            samples.add_column(s.name, overflow="fold")
        samples.add_row(*(sample(RunDir(s.path).load("best"), args.prompt, params) for s in runs))
        console.print(samples)


def cmd_scaling(args: argparse.Namespace) -> None:
    from lmlab.plots import plot_scaling
    from lmlab.runs import summarize
    from lmlab.scaling import fit_power_law

    runs = [s for s in map(summarize, map(Path, args.runs)) if s.best_val_loss is not None and s.flops]
    names = [s.name for s in runs]
    fits = [fit_power_law([s.flops for s in runs], [s.best_val_loss for s in runs], names, "compute (FLOPs)"),
            fit_power_law([s.params for s in runs], [s.best_val_loss for s in runs], names, "parameters")]
    table = Table(title=f"Power-law fits of best val loss over {len(runs)} runs")
    for column in ("against", "fit", "rmse (loss)", "R² (log-log)", "predicted loss at 10×"):
        table.add_column(column)
    for fit in fits:
        table.add_row(fit.x_label, f"L = {fit.a:.4g} · x^{fit.b:.4f}", f"{fit.rmse:.4f}", f"{fit.r2:.3f}",
                      f"{fit.predict(10 * max(fit.x)):.4f} at x = {10 * max(fit.x):.3g}")
    console.print(table)
    console.print(f"plot: {plot_scaling(fits, Path(args.plot))}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="one row per run: size, data, tokens, best val loss, status")
    p.add_argument("dir", nargs="?", default="runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("compare", help="compare runs against the first: table, overlay plot, samples")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", help="write an overlay of the loss curves to this PNG")
    p.add_argument("--x", choices=["step", "tokens", "time", "flops"], default="step", help="x axis of the plot")
    p.add_argument("--log", action="store_true", help="log-scale axes")
    p.add_argument("--prompt", help="sample every run from this prompt with the same seed")
    add_sampling(p, max_new_tokens=200)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("scaling", help="fit best val loss against compute and parameters as power laws")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default="scaling.png", help="where to draw the fits (default scaling.png)")
    p.set_defaults(func=cmd_scaling)
