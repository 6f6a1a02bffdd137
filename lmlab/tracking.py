"""Stream training metrics to the experiment trackers people already use (TensorBoard, Weights & Biases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import UserError

# metrics.jsonl field -> tracker tag, per event kind
TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu"},
    "eval": {"val_loss": "val/loss", "train_eval_loss": "train/eval_loss", "best_val_loss": "val/best_loss"},
}


class Tracker:
    """`train.tracker`: none, tensorboard (event files in the run dir) or wandb (when installed)."""

    def __init__(self, kind: str, run_dir: Path, config: dict[str, Any], resume_step: int | None = None):
        self._writer = self._wandb = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tracker = \"tensorboard\" needs the tensorboard package; "
                                "`pip install tensorboard` or set train.tracker = \"none\".")
            # Events go into the run dir itself, so `tensorboard --logdir runs` shows every run by name.
            # On resume, purge what was logged after the checkpoint, as metrics.jsonl does.
            self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise UserError("train.tracker = \"wandb\" needs the wandb package; `pip install wandb` "
                                "or set train.tracker = \"none\".")
            self._wandb = wandb.init(project="lmlab", name=Path(run_dir).name, dir=str(run_dir), config=config,
                                     resume="allow")

    def log(self, event: dict[str, Any]) -> None:
        tags = TAGS.get(event.get("event"), {})
        values = {tag: event[key] for key, tag in tags.items() if event.get(key) is not None}
        if not values:
            return
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, event["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=event["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
