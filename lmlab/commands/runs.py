"""`lmlab runs`, `lmlab compare` (`lmlab.compare`) and `lmlab scaling`: what the run folders say, side by side and
as power laws."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.commands.common import (
    add_checkpoint,
    add_device,
    add_sampling,
    console,
    counts,
    destination,
    positive,
    print_table,
    samplings,
    within,
)
from lmlab.core.errors import UserError


def cmd_runs(args: argparse.Namespace) -> None:
    from lmlab.analysis.columns import FINAL_COLUMN, PREDICTED_COLUMN, RUN_COLUMNS, evaluation_columns, run_table
    from lmlab.analysis.runs import find_runs, listed

    folder = Path("runs" if args.dir is None else args.dir)
    # Where no runs are, say so and how one is made: no table of headers, and no error for the default folder.
    paths = find_runs(folder) if args.dir is not None or folder.is_dir() else []
    rows = [{**listed(path).figures(), "run": str(path.relative_to(folder))} for path in paths]
    if args.json:
        print(json.dumps({"dir": str(folder), "runs": rows}, indent=1))
    elif not rows:
        console.print(f"No runs under {folder}: train one with `lmlab train CONFIG --run {folder}/NAME`.",
                      highlight=False)
    else:
        columns = [*RUN_COLUMNS, FINAL_COLUMN, PREDICTED_COLUMN, *evaluation_columns(rows)]
        print_table(f"Runs under {folder}", run_table(columns, rows), rows, args.wide)
        for row in rows:
            if row["problem"]:
                print(f"note: {row['run']} is unreadable: {row['problem']}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> None:
    from lmlab.analysis.plots import save
    from lmlab.api.compare import compare
    from lmlab.run.rundir import RunDir

    params = samplings(args)[0]
    compared = compare(args.runs, args.checkpoint, args.dataset, args.device, Console(stderr=True))
    runs = compared.summaries
    plot = save(compared.plot(args.x, args.log), Path(args.plot)) if args.plot else None
    texts = None
    if args.prompt is not None:
        from lmlab.inference.generate import sample

        texts = {s.name: sample(RunDir(s.path).load(args.checkpoint, args.device), args.prompt, params) for s in runs}
    if args.json:
        print(json.dumps({"base": runs[0].name, "runs": compared.rows, "not_scored": compared.not_scored,
                          "plot": plot and str(plot),
                          "samples": texts and {"prompt": args.prompt, "settings": params.describe(), "text": texts}},
                         indent=1))
        return
    print_table(compared.title, compared.columns, compared.rows, args.wide)
    if plot:
        console.print(f"plot: {plot}")
    if texts:
        table = Table(title=f"Samples, prompt {args.prompt!r}, {params.describe()}", show_lines=True)
        for name in texts:
            table.add_column(name, overflow="fold")
        table.add_row(*texts.values())
        console.print(table)


def cmd_scaling(args: argparse.Namespace) -> None:
    from lmlab.analysis.columns import Column
    from lmlab.analysis.compare import unfair
    from lmlab.analysis.plots import plot_scaling
    from lmlab.analysis.runs import summarize
    from lmlab.analysis.scaling import fit_caveats, fit_power_law

    if (args.budget or args.meant) and not args.refit:
        raise UserError("--budget and --for plan a refit's miniseries: pass them with --refit (lmlab scaling "
                        "configs/NAME.toml --refit --budget 30m).")
    if len(args.runs) == 1 and Path(args.runs[0]).suffix == ".toml":
        return show_fit(Path(args.runs[0]), args)
    if args.refit:
        raise UserError("--refit measures a preset's fit: pass one preset (lmlab scaling configs/NAME.toml --refit).")
    found = [(s, loss, flops, params) for s in map(summarize, map(Path, args.runs))
             if (loss := s.best_val_loss) is not None and (flops := s.flops) and (params := s.params)]
    runs, names, losses = [f[0] for f in found], [f[0].name for f in found], [f[1] for f in found]
    axes: dict[str, list[float] | list[int]] = {"compute (FLOPs)": [f[2] for f in found],
                                                "parameters": [f[3] for f in found]}
    if len(runs) < 2:
        raise UserError(f"scaling needs at least two runs with an evaluation; {len(runs)} of those given have one.")
    reason = unfair(runs)
    if reason:  # one law per tokenizer and text: a power law through two of them fits neither
        raise UserError(f"scaling fits one power law through runs of one tokenizer on one text, and {reason}; fit "
                        "each group apart, and compare them with `lmlab compare` (in bits per byte).")
    fits = [fit_power_law(x, losses, names, label) for label, x in axes.items() if len(set(x)) > 1]
    if not fits:
        raise UserError("every run has the same size and saw the same tokens: there is nothing to fit; pass runs "
                        "of different sizes or lengths.")
    caveats = fit_caveats(names, [s.tokens for s in runs], [f[3] for f in found], [s.still_falling for s in runs])
    columns = [Column("against", 0, lambda f: f.x_label, left=True),
               Column("fit", 0, lambda f: f"L = {f.a:.4g} · x^{f.b:.4f}", left=True),
               Column("rmse", 2, lambda f: f"{f.rmse:.4f}"), Column("R² (log)", 3, lambda f: f"{f.r2:.3f}"),
               Column("at 10× (rough)" if caveats else "predicted at 10×", 1,
                      lambda f: f"{f.predict(10 * max(f.x)):.4f} at {10 * max(f.x):.3g}")]
    print_table(f"Power-law fits of best val loss over {len(runs)} runs", columns, fits, args.wide)
    if caveats:
        console.print("[yellow]Read the figure at 10× as a rough guess, not a forecast:[/yellow]")
        for caveat in caveats:
            console.print(f"- {caveat}")
    console.print(f"plot: {plot_scaling(fits, Path(args.plot), rough=bool(caveats))}")


def show_fit(preset: Path, args: argparse.Namespace) -> None:
    """`lmlab scaling PRESET`: the fit kept beside the preset, its runs against what it predicts of them, its LR rule,
    and where and how it was measured; with --refit, measured first (the miniseries trained or continued)."""
    from lmlab.api.training import parse_duration
    from lmlab.core.busy import process_age
    from lmlab.core.config_toml import load_config
    from lmlab.experiments.family import Family, fit_path, read_fit, refit_command
    from lmlab.experiments.miniseries import Series, refit

    started = time.perf_counter() - process_age()  # as train counts its budget
    budget = parse_duration(args.budget) if args.budget else 0.0
    if not preset.is_file():
        raise UserError(f"{preset} is not a preset file; pass a TOML preset such as configs/shakespeare-char-cpu.toml.")
    if args.refit:
        series = Series(tuple(args.depths or ()), args.tokens or (), tuple(args.lr_factors or ()),
                        args.max_flops or 0.0, args.meant or ())
        refit(preset, series, Path(args.dir), args.device, console, budget, started)
    fit = read_fit(preset)
    if fit is None:
        raise UserError(f"{preset} has no fit ({fit_path(preset)}); measure it with `{refit_command(preset)}` (a "
                        "miniseries of short runs planned to the time).")
    rows = [{**r, "fitted": fit.predict(r["params"], r["tokens"], fit.dataset.get("train_tokens"))} for r in fit.runs]
    print_table(f"{fit_path(preset)}: {fit.surface.describe()}", _fit_columns(), rows, args.wide)
    lrs = ", ".join(f"{s['depth']} layers x{s['best']:.2f}" for s in fit.lr_search)
    width = Family.of(load_config(preset), str(preset)).preset_width
    console.print(f"LR rule: the preset's LR x {fit.lr.scale:g} x ({width} / width)^"
                  f"{fit.lr.exponent:g}, through each depth's best multiple of it ({lrs})", highlight=False)
    if fit.held_out:
        errors = ", ".join(f"depth {h['depth']} {100 * (h['predicted'] / h['val'] - 1):+.1f}%" for h in fit.held_out)
        console.print(f"held out: each depth's longest run against the fit through the other runs: {errors}",
                      highlight=False)
    m = fit.measured
    where = (m.get("machine") or {}).get("cpu") or "?"
    load = m.get("load") or {}
    others = "" if load.get("others") is None else f", other processes using {100 * load['others']:.0f}% of the cores"
    console.print(f"measured {m.get('when')} on {where} in {m.get('seconds', 0) / 60:.1f} min{others}; fit again "
                  f"with: {m.get('command')}", highlight=False)


def _fit_columns() -> list:
    from lmlab.analysis.columns import Column

    return [Column("depth", 0, lambda r: str(r["depth"])), Column("params", 1, lambda r: f"{r['params']:,}"),
            Column("tokens", 0, lambda r: f"{r['tokens']:,}"),
            Column("tokens/param", 3, lambda r: f"{r['tokens'] / r['params']:.2f}"),
            Column("LR", 2, lambda r: f"{r['learning_rate']:g}"), Column("val", 0, lambda r: f"{r['val']:.4f}"),
            Column("fitted", 0, lambda r: f"{r['fitted']:.4f}"),
            Column("error", 1, lambda r: f"{100 * (r['fitted'] / r['val'] - 1):+.1f}%")]


def tokens_list(text: str) -> tuple[int, ...]:
    """`64k,256k,1M`: token counts."""
    from lmlab.experiments.series import parse_tokens

    try:
        return parse_tokens(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--tokens {text[:60]!r}: ").rstrip(".")) from None


def durations(text: str) -> tuple[float, ...]:
    """`1m,5m`: durations as --budget takes them, in seconds."""
    from lmlab.api.training import parse_duration

    try:
        return tuple(sorted(parse_duration(part) for part in text.split(",")))
    except UserError:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not run budgets above 0 and up to 366 days, "
                                         "comma-separated, e.g. 1m,5m") from None


def factors(text: str) -> list[float]:
    """Comma-separated multiples above 0, at most 100."""
    return [within(0, 100, above=True)(part.strip()) for part in text.split(",")]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="one row per run: size, data, tokens, best val loss, status")
    p.add_argument("dir", nargs="?", help="folder searched for runs, sweeps included (default: runs)")
    p.add_argument("--wide", action="store_true", help="every column, however wide the table gets")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")

    p = sub.add_parser("compare", help="compare runs against the first: table, overlay plot, samples")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs; the first is the base of every ratio")
    p.add_argument("--plot", type=destination("--plot", "file"), help="write an overlay of the loss curves to this PNG")
    p.add_argument("--x", choices=["step", "tokens", "time", "flops"], default="step", help="x axis of the plot")
    p.add_argument("--log", action="store_true", help="log-scale axes")
    p.add_argument("--prompt", help="sample every run from this prompt with the same seed")
    p.add_argument("--dataset", help="dataset dir: score every run on its val split first, as "
                   "`lmlab eval --dataset` does (kept in the run; runs of another tokenizer are said and left out): "
                   "one shared text, its perplexity the column kept longest")
    add_checkpoint(p, "the checkpoint --prompt samples and --dataset scores, whose kept scores are shown")
    add_sampling(p, max_new_tokens=200)
    add_device(p, " (for --prompt and --dataset)")
    p.add_argument("--wide", action="store_true", help="every column, however wide the table gets")
    p.add_argument("--json", action="store_true", help="print the figures (and samples) as JSON instead of tables")

    p = sub.add_parser("scaling", help="fit best val loss against compute and parameters as power laws; or show (and "
                       "with --refit measure) the fit a preset's --size auto predicts with")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs with at least one evaluation (two or more), or "
                   "one preset (CONFIG.toml): the fit kept beside it, PRESET.fit.json")
    p.add_argument("--refit", action="store_true", help="with a preset: train its miniseries (each of its depths at "
                   "each of its lengths, the LR searched at the shortest; runs under --dir, finished ones kept), "
                   "planned to --budget, and keep the fit of L(N, D) and the LR rule beside the preset")
    p.add_argument("--budget", metavar="30s|5m|2h", help="with --refit: the most the miniseries may take, start-up "
                   "included: each depth's steps timed here first, what --depths, --tokens and --lr-factors leave open "
                   "planned to fit, said before any run trains; refused with the budget it needs where no plan fits")
    p.add_argument("--for", dest="meant", type=durations, metavar="1m,5m", help="with --refit --budget: the run "
                   "budgets the fit is for, its depths those --size auto weighs there and its lengths what they train "
                   "there (default: the longest whose plan fits --budget)")
    p.add_argument("--depths", type=counts, help="the family's depths the miniseries trains (default: planned)")
    p.add_argument("--tokens", type=tokens_list, help="the lengths each depth trains for, in tokens (k, M: 2**10, "
                   "2**20; default: planned)")
    p.add_argument("--lr-factors", type=factors, help="multiples of the preset's LR each depth tries at the shortest "
                   "length (default: planned, 1,2,4 or 1,2)")
    p.add_argument("--max-flops", type=positive, help="leave out the runs whose 6·N·D is past this (the largest "
                   "sizes' longest runs), e.g. 2e13")
    p.add_argument("--dir", default="runs", type=destination("--dir"), help="where the miniseries' runs go "
                   "(DIR/PRESET-miniseries/)")
    add_device(p, " (for --refit)")
    p.add_argument("--plot", default="scaling.png", type=destination("--plot", "file"), help="where to draw the fits")
    p.add_argument("--wide", action="store_true", help="every column, however wide the table gets")
