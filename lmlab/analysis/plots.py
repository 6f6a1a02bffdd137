"""Loss curves, run comparisons and scaling fits as matplotlib Figures (what `lmlab.Run.plot` and a comparison's
`plot` return, shown inline in a notebook) and as PNG files."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lmlab.analysis.compare import unfair
from lmlab.analysis.runs import RunSummary
from lmlab.analysis.scaling import PowerLawFit
from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError, check_writable, replacing
from lmlab.run.rundir import RunDir

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def pyplot() -> ModuleType:
    """matplotlib.pyplot, imported at the first plot (or when a budgeted run chooses): its ~0.5 s import is not
    paid before a run's first step. Its backend draws files only (no display on servers and in CI), unless one was
    chosen for the process (MPLBACKEND: a notebook's kernel sets its inline backend, which shows a Figure)."""
    _font_cache()
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _font_cache() -> None:
    """Where matplotlib's cache folder cannot be written (a read-only home), give it a temporary one, as it would
    make itself, but without its three lines of warning on every command that plots: the cache only saves
    rebuilding the font list, a second at the first plot."""
    if os.environ.get("MPLCONFIGDIR") or "matplotlib" in sys.modules:
        return
    try:
        check_writable(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "matplotlib" / "fontlist")
    except WriteError:
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="lmlab-matplotlib-")
        atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], ignore_errors=True)


LOSS_EVENTS = ("train", "eval", "resume")  # the events of metrics.jsonl a loss plot draws


def plot_losses(run: RunDir, path: Path | None = None) -> Path:
    """Draw train (per log interval) and val (per eval) loss against step into `path` (the run's loss.png)."""
    return save(loss_figure(run), Path(path or run.loss_plot))


def loss_figure(run: RunDir) -> plt.Figure:
    """Train (per log interval) and val (per eval) loss against step, with a dashed line where the run was resumed
    (a change of machine, threads or schedule shows there)."""
    events = [e for e in run.events() if e["event"] in LOSS_EVENTS]  # a figure not finite is null: not drawn
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train" and e["loss"] is not None]
    evals = [(e["step"], e["val_loss"]) for e in events if e["event"] == "eval" and e["val_loss"] is not None]
    fig, ax = pyplot().subplots(figsize=(8, 5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train (mean of the steps)", color="tab:blue", alpha=0.6, linewidth=1)
    if evals:
        ax.plot(*zip(*evals), label="val", color="tab:orange", marker="o", markersize=3)
        best_step, best = min(evals, key=lambda p: p[1])
        ax.annotate(f"best val {best:.4f}", (best_step, best), textcoords="offset points", xytext=(-60, 12))
    resumed = sorted({e["step"] for e in events if e["event"] == "resume"})
    for i, step in enumerate(resumed):
        label = f"resumed (at step{'s' * (len(resumed) > 1)} {', '.join(map(str, resumed))})"
        ax.axvline(step, color="tab:gray", linestyle="--", linewidth=1, label=label if not i else None)
    _titled(ax, f"{run.name}: loss")
    ax.set(xlabel="step (optimizer updates)", ylabel="cross-entropy loss (nats/token)")
    _gridded(ax, bool(train or evals or resumed))  # a run before its first log line has nothing to label
    return _done(fig)


def grad_norm_figure(run: RunDir) -> plt.Figure:
    """The gradient norm of each logged step (log scale) and the steps the guard skipped or flagged, with the LR on
    a second axis: whether the norm rises with the LR, or spikes where it peaks."""
    events = run.events()
    train = [(e["step"], e["grad_norm"], e["lr"]) for e in events if e["event"] == "train"
             and e.get("grad_norm") is not None and e.get("lr") is not None]
    bad = [(e["step"], e["grad_norm"]) for e in events if e["event"] in ("skip", "spike")
           and isinstance(e.get("grad_norm"), (int, float))]
    fig, ax = pyplot().subplots(figsize=(8, 5), dpi=120)
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], color="tab:blue", linewidth=1,
                label="gradient norm (of each logged step, before clipping)")
        lr = ax.twinx()
        lr.plot([t[0] for t in train], [t[2] for t in train], color="tab:green", alpha=0.5, linewidth=1)
        lr.set_ylabel("learning rate", color="tab:green")
    if bad:
        ax.scatter(*zip(*bad), color="tab:red", marker="x", label="skipped or flagged by the guard", zorder=3)
    if any(t[1] > 0 for t in train) or bad:
        ax.set_yscale("log")
    _titled(ax, f"{run.name}: gradient norm and learning rate")
    ax.set(xlabel="step (optimizer updates)", ylabel="gradient norm (L2, all weights)")
    _gridded(ax, bool(train or bad), loc="upper right")
    return _done(fig)


X_AXES = {
    "step": ("step (optimizer updates)", lambda s, e: e["step"]),
    "tokens": ("tokens seen", lambda s, e: e.get("tokens", 0)),
    "time": ("wall time (s)", lambda s, e: e.get("elapsed", 0.0)),
    "flops": ("training compute (FLOPs)", lambda s, e: (s.flops_per_token or 0) * e.get("tokens", 0)),
}


def comparison_figure(summaries: list[RunSummary], x: str = "step", log: bool = False) -> plt.Figure:
    """Overlay the val (solid, markers) and train (faint: the mean of the steps) curves of several runs on one x
    axis; in bits per byte when their tokenizers or data differ (a loss per token would compare different units),
    which needs each run's byte counts."""
    label, pick = X_AXES[x]
    reason = unfair(summaries)
    lacking = [s.name for s in summaries if "val" not in s.token_bytes] if reason else []
    if lacking:
        raise UserError(f"these runs cannot share a loss axis: {reason}, and {', '.join(lacking)} keeps no byte "
                        "counts of its data (dataset.json) to draw it in bits per byte; plot them apart.")

    def y(s: RunSummary, loss: float, split: str) -> float:
        bits = s.bits_per_byte(loss, split if split in s.token_bytes else "val") if reason else None
        return loss if bits is None else bits  # every run has the val split's bytes where there is a reason

    fig, ax = pyplot().subplots(figsize=(9, 5.5), dpi=120)
    for i, s in enumerate(summaries):
        color = f"C{i % 10}"
        if s.trains:
            ax.plot([pick(s, e) for e in s.trains], [y(s, e["loss"], "train") for e in s.trains], color=color,
                    alpha=0.3, linewidth=1)
        if s.evals:
            best = f"{s.best_bpb:.3f} bits/byte" if reason else f"{s.best_val_loss:.3f}"
            ax.plot([pick(s, e) for e in s.evals], [y(s, e["val_loss"], "val") for e in s.evals], color=color,
                    marker="o", markersize=3, label=_fill(f"{s.name} val (best {best})", LEGEND_CHARS))
    ax.plot([], [], color="gray", alpha=0.3, label="train: mean of the steps (faint, same colour)")
    _titled(ax, "Val and train loss by run" if not reason else f"Bits per byte by run: {reason}", 10)
    ax.set(xlabel=label, ylabel="bits per byte (loss / ln 2 / bytes per token of its split)" if reason else
           "cross-entropy loss (nats/token)")
    if log:
        _log_axes(ax)
    _gridded(ax, which="both", fontsize=8)
    return _done(fig)


def plot_scaling(fits: list[PowerLawFit], path: Path, rough: bool = False) -> Path:
    """Val loss against compute and against parameters, log-log, with each fitted power law; `rough` when the
    runs cannot support an extrapolation (`scaling.fit_caveats`), which the label then says."""
    fig, axes = pyplot().subplots(1, len(fits), figsize=(6 * len(fits), 5), dpi=120, squeeze=False)
    for ax, fit in zip(axes[0], fits):
        ax.scatter(fit.x, fit.y, color="C0", zorder=3, label="runs (best val loss)")
        for x, y, name in zip(fit.x, fit.y, fit.names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        grid = np.geomspace(min(fit.x), 10 * max(fit.x), 50)
        ax.plot(grid, fit.predict(grid), color="C1",
                label=f"fit: L = {fit.a:.3g} · x^{fit.b:.3f} (rmse {fit.rmse:.3f})")
        ax.axvline(10 * max(fit.x), color="gray", linestyle=":",
                   label=f"10× the largest run: {'a rough guess of' if rough else 'predicted'} "
                         f"{fit.predict(10 * max(fit.x)):.3f}")
        _log_axes(ax)
        ax.set(xlabel=fit.x_label, ylabel="best val loss (nats/token)",
               title=f"Val loss against {fit.x_label.split(' (')[0]}")
        _gridded(ax, which="both", fontsize=8)
    return save(fig, Path(path))


def plot_document_lengths(lengths: np.ndarray, block_size: int, path: Path) -> Path:
    """Histogram of tokens per document on a log x axis, with the context length marked."""
    fig, ax = pyplot().subplots(figsize=(8, 5), dpi=120)
    bins = np.geomspace(max(1, min(int(lengths.min()), block_size)) / 1.1,
                        max(int(lengths.max()), block_size) * 1.1, 60)
    ax.hist(np.maximum(lengths, 1), bins=bins, color="C0")
    beyond = (lengths > block_size).mean()
    ax.axvline(block_size, color="C1", linestyle="--",
               label=f"context length {block_size}: {100 * beyond:.1f}% of documents are longer")
    ax.set(xscale="log", xlabel="tokens per document (log scale)", ylabel="documents",
           title=f"Document lengths: {len(lengths):,} documents, median {np.median(lengths):,.0f} tokens")
    _gridded(ax, which="both")
    return save(fig, Path(path))


LEGEND_CHARS = 60  # a legend's entry wraps past this, inside the axes (fontsize 8: under half a 9-inch figure)
TITLE_LINES = 4  # a longer title ends in an ellipsis: the axes keep most of the figure


def _fill(text: str, chars: int, lines: int = TITLE_LINES) -> str:
    """`text` in lines of `chars` characters at most (a word longer than that broken), `lines` of them at most."""
    return textwrap.fill(text, chars, max_lines=lines, placeholder=" …")


def _titled(ax: plt.Axes, title: str, fontsize: float = 12) -> None:
    """A title that fits its figure whatever the length of the runs' names or the texts it names: wrapped, narrower
    until its widest line, measured, fits in 88% of the figure's width (it is centred on the axes, which sit a little
    off the figure's middle)."""
    text, chars = ax.set_title(title, fontsize=fontsize), len(title)
    while text.get_window_extent().width > 0.88 * ax.figure.bbox.width:
        chars = int(chars * 0.9)
        text.set_text(_fill(title, chars))


def _gridded(ax: plt.Axes, legend: bool = True, which: Literal["major", "both"] = "major", **placed: Any) -> None:
    """A faint grid (at the major ticks, or `which`), and the legend, placed as asked, when there is one."""
    ax.grid(True, alpha=0.3, which=which)
    if legend:
        ax.legend(**placed)


def _log_axes(ax: plt.Axes) -> None:
    """Log-log axes with plain-number loss labels (not 1.6×10⁰) and no crowded minor labels on x."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set(xscale="log", yscale="log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))


def _done(fig: plt.Figure) -> plt.Figure:
    """A drawn figure, laid out and closed in pyplot: a notebook shows it once, where the caller returns it (an
    open one its inline backend would show again at the cell's end), and a file is written from it all the same."""
    fig.tight_layout()
    pyplot().close(fig)
    return fig


def save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure (`loss_figure`, `grad_norm_figure`, `comparison_figure`) to `path` as a PNG, through lmlab's
    one writer (lmlab.core.fileio.replacing): never half a PNG, nothing left behind by a failed write, and a device
    or a link named as the path written through or followed, never replaced."""
    _done(fig)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
