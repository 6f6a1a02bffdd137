"""The run directory: resolved config, append-only metrics log, and loading a run's model back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig, load_config
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text
from lmlab.model.gpt import GPT
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
        """On resume, drop events logged after the checkpoint so the log reads as one uninterrupted run."""
        kept = [e for e in self.read() if e.get("step", 0) <= step]
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


def load_run_model(run_dir: Path, which: str, device: torch.device) -> tuple[GPT, RunConfig, dict[str, Any]]:
    """The model of a run at its `best` or `latest` checkpoint, in eval mode on `device`."""
    if which not in ("best", "latest"):
        raise UserError(f"--checkpoint {which} is unknown; use best or latest.")
    cfg = run_config(run_dir)
    model = GPT(cfg.model).to(device)
    state = load_checkpoint(resolve(run_dir, which), model)
    return model.eval(), cfg, state
