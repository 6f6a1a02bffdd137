"""`lmlab.compare`: runs side by side against the first, as `lmlab compare` prints them: a table that renders in a
notebook and a terminal, its figures as records or a pandas DataFrame, and their loss curves overlaid."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult

from lmlab.analysis.columns import compare_columns
from lmlab.analysis.compare import comparison, unfair
from lmlab.analysis.plots import X_AXES, comparison_figure
from lmlab.analysis.runs import RunSummary, summarize
from lmlab.api.checks import checked, pandas_for
from lmlab.api.run import Run
from lmlab.api.tables import fitted_table, html_table
from lmlab.core.errors import UserError
from lmlab.core.notebook import console_here
from lmlab.run.rundir import check_steps

if TYPE_CHECKING:
    import matplotlib.figure
    import pandas


class Comparison:
    """Runs compared with the first (`rows`: each run's figures and its ratios to the first's; `columns`: how the
    table shows them). In bits per byte where the runs' tokenizers or texts differ (`reason` says how). `shared`: the
    val split's checksum of the text every run was scored on first (`compare(dataset=...)`), whose columns lead;
    `not_scored`: the runs that were not, their tokenizer not its."""

    def __init__(self, summaries: list[RunSummary], shared: str | None = None, not_scored: list[str] | None = None):
        self.summaries, self.shared, self.not_scored = summaries, shared, not_scored or []
        self.rows: list[dict[str, Any]] = comparison(summaries)
        self.reason = unfair(summaries)
        change = f"bits/byte: % change, as {self.reason}" if self.reason else "best val: % change"
        self.title = f"Compared with {summaries[0].name} (× its figure; {change})"
        self.columns = compare_columns(self.rows, shared)

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


@checked(runs="runs", checkpoint="checkpoint", dataset="path?", device="name", console="console?")
def compare(runs: Iterable[str | Path | Run], checkpoint: str = "best", dataset: str | Path | None = None,
            device: str = "auto", console: Console | None = None) -> Comparison:
    """Compare runs (paths or Runs; the first is the base of every ratio), each with an evaluation: parameters,
    tokens, compute, wall time, best val loss (and its change), bits per byte, epochs, Chinchilla share, the gap
    to the train split, and the perplexity, accuracy, task and judge scores kept for `checkpoint` (a column per text
    scored). With `dataset`, every run of its tokenizer not yet scored on its val split is scored on it first, as
    `Run.eval` scores it (on `device`, its progress on `console`), the others said in a line and left out."""
    runs = [runs] if isinstance(runs, (str, os.PathLike, Run)) else runs
    paths = [run.path if isinstance(run, Run) else Path(os.fspath(run)) for run in runs]
    if not paths:
        raise UserError("compare needs at least one run; pass run folders (the first is the base of every ratio).")
    check_steps(paths, checkpoint)
    summaries = [summarize(path, checkpoint) for path in paths]
    shared, not_scored = None, None
    if dataset is not None:
        shared, not_scored = _score_on(Path(dataset), summaries, checkpoint, device, console or console_here())
        summaries = [summarize(path, checkpoint) for path in paths]
    for s in summaries:
        if s.best_val_loss is None or not s.params:
            which = "" if checkpoint == "best" else f" --checkpoint {checkpoint}"
            how = (f"evaluate it on a val split of its tokenizer with `lmlab eval {s.path} --dataset DIR{which}`"
                   if s.kind == "imported" else
                   f"train it past one eval_interval, or evaluate it with `lmlab eval {s.path}{which}`")
            raise UserError(f"{s.path} has no evaluation to compare ({s.status}); {how}.")
    return Comparison(summaries, shared, not_scored)


def _score_on(dataset: Path, summaries: list[RunSummary], checkpoint: str, device: str,
              out: Console) -> tuple[str, list[str]]:
    """The checksum of `dataset`'s val split, every run of its tokenizer not yet scored on the split whole scored on
    it (kept in the run's evaluations.json), and the names of the runs of another tokenizer, said in one line: their
    token ids mean other text under its vocabulary."""
    from lmlab.data.shards import read_meta
    from lmlab.data.tokenizers import tokenizer_identity

    meta = read_meta(dataset)
    identity = tokenizer_identity(dataset / "tokenizer.json")
    other = [s for s in summaries if not (s.path / "tokenizer.json").is_file()
             or tokenizer_identity(s.path / "tokenizer.json") != identity]
    if other:
        theirs = ", ".join(f"{s.name} ({s.tokenizer})" for s in other)
        out.print(f"{theirs}: not scored on {dataset}, whose tokenizer ({meta['tokenizer']}) is not theirs.",
                  highlight=False, soft_wrap=True)
    for s in summaries:
        if all(s is not o for o in other) and all(e.get("val_sha256") != meta["val"]["sha256"] for e in s.evaluations):
            Run(s.path, out).eval(checkpoint, dataset=dataset, device=device)
    return meta["val"]["sha256"], [s.name for s in other]
