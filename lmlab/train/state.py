"""What the training loop keeps besides weights and optimizer, each part saving and restoring itself in place
(`state_dict` / `load_state_dict`), so nothing holds a stale copy after a resume or a rollback."""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch


class Saved:
    """A dataclass whose fields are its checkpointed state, restored into the same object."""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class Progress(Saved):
    """Where the run stands: what a rollback takes back to the checkpoint's values."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float = float("inf")
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass
class Mean(Saved):
    """The mean of the values added since it was last taken (train loss per log line, per eval)."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    def take(self) -> float:
        mean = self.total / max(1, self.count)
        self.total, self.count = 0.0, 0
        return mean


class Stopwatch:
    """Wall seconds of training, summed over resumes: what `train.max_seconds` and the `elapsed` fields count."""

    def __init__(self) -> None:
        self.before, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # on resume, before start()
        self.before = state["elapsed"]


def rng_state(device: torch.device) -> dict[str, str | None]:
    """The torch (and CUDA) generator states as base64 text for state.json."""
    def text(state: torch.Tensor) -> str:
        return base64.b64encode(state.cpu().numpy().tobytes()).decode()
    return {"torch": text(torch.get_rng_state()),
            "cuda": text(torch.cuda.get_rng_state()) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, str | None], device: torch.device) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(tensor(state["torch"]))
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def upgrade_training(saved: dict[str, Any]) -> dict[str, Any]:
    """A trained run's checkpoint state from before the parts saved themselves: one `progress` dict that held the
    loss averages, the elapsed time, the LR scale and the guard's statistics, and the RNG states apart."""
    if "means" in saved:
        return saved
    old = saved["progress"]
    return {
        "progress": {f.name: old[f.name] for f in dataclasses.fields(Progress)},
        "means": {"log": {"total": old["loss_since_log"], "count": old["steps_since_log"]},
                  "eval": {"total": old["loss_since_eval"], "count": old["steps_since_eval"]}},
        "guard": {**old["guard"], "lr_scale": old["lr_scale"]}, "clock": {"elapsed": old["elapsed"]},
        "loader": saved["loader"], "rng": {"torch": saved["torch_rng"], "cuda": saved.get("cuda_rng")},
        "scaler": saved.get("scaler"), "dataset_sha256": saved["dataset_sha256"],
    }
