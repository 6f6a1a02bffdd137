"""The columns of the tables of runs (`lmlab runs`, `compare`, `sweep`, `eval --task`, the report): each a header, a
priority for narrowing and a cell drawn from a row of figures (`lmlab.analysis.runs.RunSummary.figures()`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.core.humanize import count, fmt, format_duration, sci


@dataclass(frozen=True)
class Column:
    """A table column: its header, its priority (0 is kept longest when a table must be narrowed) and its cell."""

    header: str
    priority: int
    cell: Callable[[Any], str]  # a row (a dict of figures, or an object) -> its text
    left: bool = False
    needs: str = ""  # a figure of the rows: where no row has it, `run_table` leaves the column out


def run_table(columns: list[Column], rows: list[dict[str, Any]]) -> list[Column]:
    """The columns a table of runs shows: those whose `needs` a row has; where the rows' tokenizers differ, bits per
    byte the column kept longest when the table must be narrowed."""
    tokenizers = {r.get("tokenizer") for r in rows if r.get("tokenizer")}
    by_bytes = len(tokenizers) > 1 or any(r.get("by_bytes") for r in rows)
    swap = {"bits/byte": 0, "best val": 6} if by_bytes else {}
    return [dataclasses.replace(c, priority=swap.get(c.header, c.priority)) for c in columns
            if not c.needs or any(r.get(c.needs) is not None for r in rows)]


def _times(value: float | None) -> str:
    return "" if value is None else f" {value:.2f}×"


def _change(row: dict[str, Any], key: str, by_bytes: bool) -> str:
    return f" ({100 * row[key]:+.1f}%)" if row.get("by_bytes", False) == by_bytes and row[key] is not None else ""


def _chinchilla(row: dict[str, Any]) -> str:
    """The share of Chinchilla-optimal in unique tokens, and in tokens seen when repeats make them differ."""
    unique, seen = row["chinchilla_percent"], row["chinchilla_seen_percent"]
    return "-" if unique is None else f"{unique:.1f}%" + (f" ({seen:.0f}% seen)" if seen > unique * 1.001 else "")


RUN_COLUMNS = [  # `lmlab runs`: RunSummary.figures() with "run" the path under the listed folder
    Column("run", 0, lambda r: r["run"], left=True),
    Column("status", 1, lambda r: r["status"], left=True),
    Column("arch", 2, lambda r: r["architecture"] or "-", left=True),
    Column("shape", 9, lambda r: r["shape"] or "-", left=True),
    Column("params", 3, lambda r: count(r["params"])),
    Column("dataset", 7, lambda r: Path(r["dataset"]).name if r["dataset"] else "-", left=True),
    Column("tokenizer", 11, lambda r: r["tokenizer"] or "-", left=True),
    Column("tokens", 4, lambda r: count(r["tokens"])),
    Column("steps", 8, lambda r: f"{r['steps']:,}"),
    Column("epochs", 14, lambda r: fmt(r["epochs"], ".2f")),
    Column("best val", 0, lambda r: fmt(r["best_val_loss"])),
    Column("bits/byte", 6, lambda r: fmt(r["best_bpb"], ".3f")),
    Column("val-train(eval)", 10, lambda r: fmt(r["gap"], "+.3f")),
    Column("wall", 5, lambda r: format_duration(r["elapsed"]) if r["elapsed"] else "-"),
    Column("device", 12, lambda r: r["device"] or "-", left=True),
    Column("model", 13, lambda r: r["model"] or "-", left=True),
    Column("judge (scored, model)", 9, lambda r: judge_cell(r["judge"]), left=True),
]

PREDICTED_COLUMN = Column(  # the val `--size auto` predicted for a run beside what it reached (its final score)
    "predicted val", 1, lambda r: fmt(r.get("predicted_val")) + (
        "" if r.get("predicted_error") is None else f" ({100 * r['predicted_error']:+.1f}%)"), needs="predicted_val")


def final_cell(value: float | None, stderr: float | None) -> str:
    """A final score: `1.5796 ± 0.0010` on a sample of the split, `1.5796` on the whole of it."""
    return "-" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "")


# Each run's final score (its last checkpoint on the val split): what a comparison should be read by, where the best
# val is the least of noisy estimates.
FINAL_COLUMN = Column("final val", 0, lambda r: final_cell(r.get("final_val_loss"), r.get("final_stderr")),
                      needs="final_val_loss")


def evaluation_columns(rows: list[dict[str, Any]], first: str | None = None) -> list[Column]:
    """The perplexity and accuracy of the rows' kept whole-split `lmlab eval`s (`RunSummary.evaluations`): a column
    of each per text scored, headed by its dataset's name (and its val split's checksum where two texts share a
    name); the text of checksum `first` (`compare --dataset`'s) leads and is kept longest."""
    def cell(text: str, key: str, spec: str, r: dict[str, Any]) -> str:
        return fmt(next((e[key] for e in r.get("evaluations") or [] if e.get("val_sha256") == text), None), spec)

    names = {e.get("val_sha256"): Path(str(e.get("dataset"))).name for r in rows for e in r.get("evaluations") or []}
    columns = []
    for text in sorted(names, key=lambda text: text != first):
        name = names[text] if list(names.values()).count(names[text]) == 1 else f"{names[text]} {str(text)[:8]}"
        columns += [Column(f"perplexity on {name}", 0 if text == first else 8,
                           functools.partial(cell, text, "perplexity", ".2f")),
                    Column(f"accuracy on {name}", 7 if text == first else 9,
                           functools.partial(cell, text, "accuracy", ".3f"))]
    return columns


def judge_cell(judge: dict[str, Any] | None) -> str:
    """The judge's mean score with how many answers it scored and which model judged: `62.3 (18/20, NAME)`."""
    if not judge:
        return "-"
    mean = "-" if judge.get("mean") is None else f"{judge['mean']:.1f}"
    return f"{mean} ({judge.get('scored', 0)}/{judge.get('total', 0)}, {judge.get('judge_model')})"


def score_cell(value: float | None, stderr: float | None) -> str:
    """A task score with its standard error: `0.3120 ± 0.0046`."""
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else "")


def task_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """A column per task any row has a kept result of (acc_norm, as HellaSwag is reported, with the items scored)."""
    def cell(name: str, r: dict[str, Any]) -> str:
        result = (r.get("tasks") or {}).get(name)
        return "-" if result is None else f"{result['acc_norm']:.4f} ({result['items']:,})"

    names = sorted({name for r in rows for name in (r.get("tasks") or {})})
    return [Column(f"{name} acc_norm (items)", 2, functools.partial(cell, name)) for name in names]


TASK_RESULT_COLUMNS = [  # `lmlab eval --task` and the report: kept task results
    Column("task", 0, lambda r: r["task"], left=True),
    Column("items", 1, lambda r: f"{r['items']:,}"),
    Column("acc", 0, lambda r: score_cell(r["acc"], r["acc_stderr"])),
    Column("acc_norm", 0, lambda r: score_cell(r["acc_norm"], r["acc_norm_stderr"])),
    Column("chance", 2, lambda r: f"{r['chance']:.4f}"),
    Column("step", 4, lambda r: f"{r['step']:,}"),
    Column("time", 3, lambda r: format_duration(r["seconds"])),
]

COMPARE_COLUMNS = [  # `lmlab compare` and the report: the rows of `comparison`
    Column("run", 0, lambda r: r["run"], left=True),
    Column("arch", 3, lambda r: r["architecture"] or "-", left=True),
    Column("params", 1, lambda r: count(r["params"]) + _times(r["params_ratio"])),
    Column("tokens", 4, lambda r: count(r["tokens"]) + _times(r["tokens_ratio"])),
    Column("compute", 2, lambda r: sci(r["flops"]) + _times(r["flops_ratio"])),
    Column("wall", 5, lambda r: "-" if r["elapsed"] is None else format_duration(r["elapsed"]) +
           _times(r["elapsed_ratio"])),
    Column("best val", 0, lambda r: f"{r['best_val_loss']:.4f}" + _change(r, "best_val_loss_change", False) +
           (" (eval)" if r["val_from"] != "training" else "")),
    Column("bits/byte", 6, lambda r: fmt(r["bits_per_byte"], ".3f") + _change(r, "bits_per_byte_change", True)),
    Column("epochs", 12, lambda r: fmt(r["epochs"], ".2f")),
    Column("time/epoch", 13, lambda r: format_duration(r["epoch_seconds"]) if r["epoch_seconds"] else "-"),
    Column("tok/param", 9, lambda r: fmt(r["tokens_per_param"], ".1f")),
    Column("Chinchilla", 7, _chinchilla),
    Column("val-train(eval)", 10, lambda r: fmt(r["gap"], "+.3f")),
    Column("falling", 8, lambda r: "-" if r["still_falling"] is None else "yes" if r["still_falling"] else "no"),
    Column("status", 11, lambda r: r["status"], left=True),
    Column("judge (scored, model)", 6, lambda r: judge_cell(r["judge"]), left=True),
]


def compare_columns(rows: list[dict[str, Any]], first: str | None = None) -> list[Column]:
    """The columns of runs compared (`lmlab compare`, `sweep`, the report): `comparison`'s rows, the text of checksum
    `first` leading the evaluations' (`evaluation_columns`)."""
    return run_table([*COMPARE_COLUMNS, FINAL_COLUMN, PREDICTED_COLUMN, *evaluation_columns(rows, first),
                      *task_columns(rows)], rows)
