"""A run's evaluations one by one, as the tables of the write-ups ("iter / train / val"): `lmlab log RUN` (a table
of 80 columns, JSON or CSV) and the report's table of every evaluation."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from lmlab.analysis.columns import Column
from lmlab.core.humanize import count, fmt, format_duration
from lmlab.run.rundir import RunDir

FIELDS = ("step", "epoch", "tokens", "elapsed", "train_loss", "train_eval_loss", "val_loss", "best_val_loss",
          "is_best", "perplexity", "accuracy", "grad_norm", "grad_norm_max")  # of each row, as JSON and CSV give them
LOGGED = FIELDS[:9]  # what an eval event holds; the others are derived or joined (`_derived`)


def evaluations(run: RunDir) -> list[dict[str, Any]]:
    """Every eval event of the run in the order it was logged, each with FIELDS (None where the event has none: a
    fine-tune scores no train split, an older run logged no epoch): its val perplexity and next-token accuracy, both
    of the batches its val loss is of (where the event has no accuracy, as an older lmlab's has not, that of a
    whole-split `lmlab eval` kept for the checkpoint of its step on the same split; None: not measured), and the mean
    and largest gradient norm of the train lines logged since the evaluation before. One past the run's newest
    checkpoint (its checkpoint never written: a full disk, a kill) is no new best: the best the run holds is the one
    before."""
    rows, norms = [], []
    # Of the text the events' val loss is of: a trained run's val split (a fine-tune's is its held-out records).
    split = (run.dataset().get("val") or {}).get("sha256") if run.kind() == "trained" else None
    measured = {r.get("step"): r.get("accuracy") for r in run.kept("results")
                if r.get("max_tokens") is None and split and r.get("val_sha256") == split}
    for event in run.events():
        if event.get("event") == "train" and isinstance(event.get("grad_norm"), (int, float)):
            norms.append(float(event["grad_norm"]))
        elif event.get("event") == "eval" and isinstance(event.get("val_loss"), (int, float)):
            accuracy = event.get("val_accuracy")
            rows.append({**{name: event.get(name) for name in LOGGED}, **_derived(event["val_loss"], norms),
                         "accuracy": measured.get(event.get("step")) if accuracy is None else accuracy})
            norms = []
    saved, best = run.saved_through(), None
    for row in rows:
        if saved is not None and isinstance(row["step"], int) and row["step"] > saved:
            row["is_best"], row["best_val_loss"] = False, best
        best = row["best_val_loss"]
    return rows


def _derived(val_loss: float, norms: list[float]) -> dict[str, Any]:
    return {"perplexity": math.exp(val_loss) if val_loss < MAX_LOG else None,
            "grad_norm": sum(norms) / len(norms) if norms else None, "grad_norm_max": max(norms, default=None)}


MAX_LOG = 700.0  # exp() of more overflows a float: such a perplexity is unknown (None), not an error


EVAL_COLUMNS = [  # `lmlab log` and the report
    Column("step", 0, lambda r: f"{r['step']:,}"),
    Column("epoch", 3, lambda r: fmt(r["epoch"], ".2f")),
    Column("tokens", 2, lambda r: count(r["tokens"])),
    Column("elapsed", 4, lambda r: "-" if r["elapsed"] is None else format_duration(r["elapsed"])),
    Column("train (steps)", 5, lambda r: fmt(r["train_loss"])),
    Column("train (eval)", 1, lambda r: fmt(r["train_eval_loss"])),
    Column("val", 0, lambda r: fmt(r["val_loss"])),
    Column("best (*: new)", 0, lambda r: ("* " if r["is_best"] else "") + fmt(r["best_val_loss"])),
    Column("perplexity", 6, lambda r: fmt(r["perplexity"], ".2f")),
    Column("accuracy", 7, lambda r: fmt(r["accuracy"], ".3f")),
    Column("grad norm (mean / max)", 8,
           lambda r: "-" if r["grad_norm"] is None else f"{r['grad_norm']:.2f} / {r['grad_norm_max']:.2f}"),
]


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV with a header of FIELDS: numbers as logged, empty where unknown."""
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
