"""Listing and summarising run folders for `lmlab runs`, `compare`, `scaling` and `plan`: read without trusting
them, so a half-written, old or foreign folder gets a status instead of a crash."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import UserError
from lmlab.model import build_model
from lmlab.rundir import RunDir


@dataclass
class RunSummary:
    """What `lmlab runs` and `lmlab compare` show about one run directory; None where it is unknown."""

    path: Path
    status: str  # finished | stopped early | stopped (SIGTERM) | running | crashed | half-written | not a run
    params: int | None = None
    dataset: str | None = None
    tokenizer: str | None = None
    model: str | None = None  # LanguageModel.describe(), e.g. "gpt 4L/256 rope" or "recurrent gru 2L/512"
    flops_per_token: float | None = None  # LanguageModel.flops_per_token()
    device: str | None = None
    steps: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_bpb: float | None = None
    gap: float | None = None  # val - train loss (same fixed batches, eval mode) at the best eval
    still_falling: bool | None = None  # the last eval was the best one
    evals: list[dict[str, Any]] = field(default_factory=list)
    trains: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def flops(self) -> float | None:
        """Training compute: FLOPs per token (the model's one definition) × tokens seen."""
        return self.flops_per_token * self.tokens if self.flops_per_token else None


def _status(run: RunDir, events: list[dict[str, Any]]) -> str:
    if not events or events[0].get("event") != "start":
        return "half-written"
    last = events[-1]
    if last.get("event") == "end":
        if last.get("stopped_by"):
            return f"stopped ({last['stopped_by']})"
        return "stopped early" if last.get("stopped_early") else "finished"
    return "running" if run.running() else "crashed"


def _describe(run: RunDir, start: dict[str, Any], summary: RunSummary) -> None:
    """The model's description and FLOPs per token, from the start event or (older runs) its config."""
    summary.model, summary.flops_per_token = start.get("model"), start.get("flops_per_token")
    if summary.model and summary.flops_per_token:
        return
    try:
        with torch.device("meta"):  # the shape alone, nothing allocated
            model = build_model(run.config().model)
    except (UserError, AssertionError):  # a config from another version, hand-edited, or without a vocab
        return
    summary.model, summary.flops_per_token = model.describe(), model.flops_per_token()


def summarize(run_dir: Path) -> RunSummary:
    """Read a run dir without trusting it: a half-written, old or foreign dir gets a status, not a crash."""
    run = RunDir(run_dir)
    if not (run.path / "config.toml").exists() and not (run.path / "metrics.jsonl").exists():
        return RunSummary(run.path, "not a run")
    events = run.events()
    summary = RunSummary(run.path, _status(run, events))
    start = events[0] if events and events[0].get("event") == "start" else {}
    summary.params, summary.device = start.get("params"), start.get("device")
    summary.dataset, summary.tokenizer = start.get("dataset"), start.get("tokenizer")
    _describe(run, start, summary)
    summary.evals = [e for e in events if e.get("event") == "eval" and "val_loss" in e]
    summary.trains = [e for e in events if e.get("event") == "train" and "loss" in e]
    progress = [e for e in events if "step" in e and "tokens" in e]
    if progress:
        summary.steps, summary.tokens = progress[-1]["step"], progress[-1]["tokens"]
        summary.elapsed = max(e.get("elapsed", 0.0) for e in progress)
    if summary.evals:
        best = min(summary.evals, key=lambda e: e["val_loss"])
        summary.best_val_loss, summary.best_step = best["val_loss"], best["step"]
        if "train_eval_loss" in best:
            summary.gap = best["val_loss"] - best["train_eval_loss"]
        summary.still_falling = summary.evals[-1] is best
        summary.best_bpb = _bits_per_byte(run, best["val_loss"])
    return summary


def _bits_per_byte(run: RunDir, loss: float) -> float | None:
    """Loss in bits per UTF-8 byte of the val text, from the dataset facts the run keeps."""
    try:
        val = run.dataset()["val"]
        return loss / math.log(2) * val["tokens"] / val["bytes"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def find_runs(root: Path) -> list[Path]:
    """Every directory under root that looks like a run, plus the direct children that do not (to list them)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the folder that holds your runs (default: runs).")
    runs = {p.parent for p in root.rglob("config.toml")} | {p.parent for p in root.rglob("metrics.jsonl")}
    runs |= {p for p in root.iterdir() if p.is_dir() and not any(r.is_relative_to(p) for r in runs)}
    return sorted(runs)
