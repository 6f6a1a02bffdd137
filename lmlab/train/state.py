"""What a checkpoint of a trained run holds besides weights and optimizer (`TrainingState`), each part saving and
restoring itself in place, so nothing holds a stale copy after a resume or a rollback; and the loop's throughput."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

import torch

from lmlab.core.device import synchronize


class Checkpointed:
    """A dataclass whose fields are its checkpointed state, restored into the same object."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # each subclass is a dataclass

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class Progress(Checkpointed):
    """Where the run stands: what a rollback takes back to the checkpoint's values."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float = float("inf")
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass
class Mean(Checkpointed):
    """The mean of the values added since it was last taken (train loss per log line, per eval)."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    def pop_mean(self) -> float:
        mean = self.total / max(1, self.count)
        self.total, self.count = 0.0, 0
        return mean


class Means(dict):
    """The named means of the train loss (`log`: since the last log line; `eval`: since the last evaluation)."""

    def add(self, value: float) -> None:
        for mean in self.values():
            mean.add(value)

    def state_dict(self) -> dict[str, Any]:
        return {name: mean.state_dict() for name, mean in self.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mean in self.items():
            mean.load_state_dict(state[name])


@dataclass
class Stopwatch:
    """Wall seconds of training, summed over resumes: what the `elapsed` fields count."""

    before: float = 0.0
    started: float | None = None  # set by start()

    def start(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # on resume, before start()
        self.before = state["elapsed"]


class RngTexts(TypedDict):
    torch: str
    cuda: str | None  # of a CUDA run only


def upgrade_training(saved: dict[str, Any]) -> dict[str, Any]:
    """A trained run's checkpoint state from before the parts saved themselves, in today's shape."""
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


class RngState:
    """The torch (and CUDA) generators, as a part of the training state."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> RngTexts:
        """The generator states as base64 text for state.json."""
        def text(state: torch.Tensor) -> str:
            return base64.b64encode(state.cpu().numpy().tobytes()).decode()
        return {"torch": text(torch.get_rng_state()),
                "cuda": text(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None}

    def load_state_dict(self, state: RngTexts) -> None:
        def tensor(text: str) -> torch.Tensor:
            return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
        torch.set_rng_state(tensor(state["torch"]))
        if self.device.type == "cuda" and (cuda := state.get("cuda")):
            torch.cuda.set_rng_state(tensor(cuda))


class ScalerState:
    """The fp16 grad scaler's scale and growth tracker; None when it is off (other dtypes)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.scaler.load_state_dict(state)


@dataclass
class Slot:
    """A part whose state another object keeps: saved by calling `state_dict`, restored by handing it to
    `load_state_dict`."""

    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], None]


class TrainingState:
    """state.json's `training` of a trained run: its parts by name, each restored in place. A rollback puts back only
    where the run stood (ROLLED_BACK); it keeps the data position (the bad batches are not replayed), the guard, the
    grad scaler, the clock, the schedule and the budget."""

    ROLLED_BACK = ("progress", "means", "rng")

    def __init__(self, **parts: Any):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any], rollback: bool = False) -> None:
        """Put a checkpoint's state back (parts it lacks, being older than them, get None: their defaults)."""
        for name, part in self.parts.items():
            if not rollback or name in self.ROLLED_BACK:
                part.load_state_dict(state.get(name))


class Throughput:
    """The seconds of the training steps since the last log line, for ms/step, tokens/s and MFU. A process's first step
    (compiling, allocating, warming caches) is left out, on a first start and on every resume, and waited for."""

    def __init__(self, device: torch.device):
        self.device, self.warm, self.step_seconds = device, False, Mean()

    def add(self, seconds: float) -> None:
        if self.warm:
            self.step_seconds.add(seconds)
        else:
            synchronize(self.device)
            self.warm = True

    def pop_step_seconds(self) -> float | None:
        """The mean seconds of a step since the last call; None when no step since was timed."""
        return self.step_seconds.pop_mean() if self.step_seconds.count else None
