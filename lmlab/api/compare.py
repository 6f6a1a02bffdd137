"""`lmlab.compare`: runs side by side against the first, as `lmlab compare` prints them: a table that renders in a
notebook and a terminal, its figures as records or a pandas DataFrame, and their loss curves overlaid."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult

from lmlab.analysis.compare import comparison, unfair
from lmlab.analysis.plots import X_AXES, comparison_figure
from lmlab.analysis.runs import RunSummary, compare_columns, summarize
from lmlab.api.checks import checked, pandas_for
from lmlab.api.run import Run
from lmlab.api.tables import fitted_table, html_table
from lmlab.core.errors import UserError
from lmlab.run.rundir import check_steps

if TYPE_CHECKING:
    import matplotlib.figure
    import pandas


class Comparison:
    """Runs compared with the first (`rows`: each run's figures and its ratios to the first's; `columns`: how the
    table shows them). In bits per byte where the runs' tokenizers or texts differ (`reason` says how)."""

    def __init__(self, summaries: list[RunSummary]):
        self.summaries = summaries
        self.rows: list[dict[str, Any]] = comparison(summaries)
        self.reason = unfair(summaries)
        change = f"bits/byte: % change, as {self.reason}" if self.reason else "best val: % change"
        self.title = f"Compared with {summaries[0].name} (× its figure; {change})"
        self.columns = compare_columns(self.rows)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield fitted_table(console, options.max_width, self.title, self.columns, self.rows,
                           every="`rows` holds every figure")[0]

    def _repr_html_(self) -> str:
        return html_table(self.title, self.columns, self.rows)

    def __str__(self) -> str:
        text = io.StringIO()
        Console(file=text, width=120, color_system=None, force_jupyter=False).print(self)
        return text.getvalue()

    __repr__ = __str__

    @checked()
    def to_pandas(self) -> pandas.DataFrame:
        """`rows` as a pandas DataFrame indexed by run (pandas must be installed)."""
        return pandas_for("to_pandas", "Comparison.rows", "figures").DataFrame(self.rows).set_index("run")

    @checked(x="text", log="flag")
    def plot(self, x: str = "step", log: bool = False) -> matplotlib.figure.Figure:
        """The runs' val (markers) and train (faint) curves overlaid against `x` (step, tokens, time or flops), on
        log axes with `log`, as a matplotlib Figure (what `lmlab compare --plot` writes)."""
        if x not in X_AXES:
            raise UserError(f"x is {x!r}; use one of {', '.join(X_AXES)}.")
        return comparison_figure(self.summaries, x, log)


@checked(runs="runs", checkpoint="checkpoint")
def compare(runs: Iterable[str | Path | Run], checkpoint: str = "best") -> Comparison:
    """Compare runs (paths or Runs; the first is the base of every ratio), each with an evaluation: parameters,
    tokens, compute, wall time, best val loss (and its change), bits per byte, epochs, Chinchilla share, the gap
    to the train split, and the perplexity, accuracy, task and judge scores kept for `checkpoint` (a column per text
    scored)."""
    runs = [runs] if isinstance(runs, (str, os.PathLike, Run)) else runs
    paths = [run.path if isinstance(run, Run) else Path(os.fspath(run)) for run in runs]
    if not paths:
        raise UserError("compare needs at least one run; pass run folders (the first is the base of every ratio).")
    check_steps(paths, checkpoint)
    summaries = [summarize(path, checkpoint) for path in paths]
    for s in summaries:
        if s.best_val_loss is None or not s.params:
            which = "" if checkpoint == "best" else f" --checkpoint {checkpoint}"
            how = (f"evaluate it on a val split of its tokenizer with `lmlab eval {s.path} --dataset DIR{which}`"
                   if s.kind == "imported" else
                   f"train it past one eval_interval, or evaluate it with `lmlab eval {s.path}{which}`")
            raise UserError(f"{s.path} has no evaluation to compare ({s.status}); {how}.")
    return Comparison(summaries)
