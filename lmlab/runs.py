"""The run directory: resolved config, append-only metrics log, and loading a run's model back."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig, load_config
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text
from lmlab.model import LanguageModel, build_model
from lmlab.train.checkpoint import load_checkpoint, resolve


class MetricsLog:
    """`metrics.jsonl`: one JSON object per event, appended and flushed so a crash loses at most one line."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def append(self, event: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path.parent)

    def truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint (and the end of a stopped run), so the log
        reads as one uninterrupted run."""
        kept = [e for e in self.read() if e.get("step", 0) <= step and e.get("event") != "end"]
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return events


def run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise UserError(f"{run_dir} is not an lmlab run (no config.toml); pass a directory made by `lmlab train`.")
    return load_config(path)


def load_run_model(run_dir: Path, which: str, device: torch.device) -> tuple[LanguageModel, RunConfig, dict[str, Any]]:
    """The model of a run at its `best` or `latest` checkpoint, in eval mode on `device`."""
    if which not in ("best", "latest"):
        raise UserError(f"--checkpoint {which} is unknown; use best or latest.")
    cfg = run_config(run_dir)
    model = build_model(cfg.model).to(device)
    state = load_checkpoint(resolve(run_dir, which), model)
    return model.eval(), cfg, state


def load_run_tokenizer(run_dir: Path) -> Tokenizer:
    """The tokenizer a run keeps (tokenizer.json, its spec in dataset.json), so it works without its dataset."""
    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / "dataset.json").read_text(encoding="utf-8"))["tokenizer"]
    except (OSError, json.JSONDecodeError, KeyError):
        spec = None
    if not spec or not (run_dir / "tokenizer.json").exists():
        raise UserError(f"{run_dir} has no tokenizer (tokenizer.json and its spec in dataset.json); import it from a "
                        "folder that has the tokenizer files, or copy them in.")
    return Tokenizer.load(run_dir / "tokenizer.json", spec)


@dataclass
class RunSummary:
    """What `lmlab runs` and `lmlab compare` show about one run directory; None where it is unknown."""

    path: Path
    status: str  # finished | stopped early | stopped (SIGTERM) | running | crashed | half-written | not a run
    params: int | None = None
    dataset: str | None = None
    tokenizer: str | None = None
    model: str | None = None  # kind and shape, e.g. "gpt 4L/256" or "recurrent gru 2L/512"
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
        """Training compute by the 6·N·D rule."""
        return 6.0 * self.params * self.tokens if self.params else None


def _status(run_dir: Path, events: list[dict[str, Any]]) -> str:
    if not events or events[0].get("event") != "start":
        return "half-written"
    last = events[-1]
    if last.get("event") == "end":
        if last.get("stopped_by"):
            return f"stopped ({last['stopped_by']})"
        return "stopped early" if last.get("stopped_early") else "finished"
    pid_file = Path(run_dir) / "train.pid"
    try:
        os.kill(int(pid_file.read_text()), 0)
        return "running"
    except (OSError, ValueError):
        return "crashed"


def summarize(run_dir: Path) -> RunSummary:
    """Read a run dir without trusting it: a half-written, old or foreign dir gets a status, not a crash."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists() and not (run_dir / "metrics.jsonl").exists():
        return RunSummary(run_dir, "not a run")
    events = read_metrics(run_dir)
    summary = RunSummary(run_dir, _status(run_dir, events))
    start = events[0] if events and events[0].get("event") == "start" else {}
    summary.params, summary.device = start.get("params"), start.get("device")
    summary.dataset, summary.tokenizer = start.get("dataset"), start.get("tokenizer")
    try:
        shape = run_config(run_dir).model
        kind = f"recurrent {shape.rnn_cell}" if shape.kind == "recurrent" else shape.kind
        summary.model = f"{kind} {shape.n_layer}L/{shape.n_embd}"
    except UserError:  # a config from another version or hand-edited: list the run anyway
        pass
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
        summary.best_bpb = _bits_per_byte(run_dir, best["val_loss"])
    return summary


def _bits_per_byte(run_dir: Path, loss: float) -> float | None:
    """Loss in bits per UTF-8 byte of the val text, from the dataset facts the run keeps."""
    try:
        val = json.loads((run_dir / "dataset.json").read_text())["val"]
        return loss / math.log(2) * val["tokens"] / val["bytes"]
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return None


def find_runs(root: Path) -> list[Path]:
    """Every directory under root that looks like a run, plus the direct children that do not (to list them)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the folder that holds your runs (default: runs).")
    runs = {p.parent for p in root.rglob("config.toml")} | {p.parent for p in root.rglob("metrics.jsonl")}
    runs |= {p for p in root.iterdir() if p.is_dir() and not any(r.is_relative_to(p) for r in runs)}
    return sorted(runs)
