"""How a training run ends: its `TrainResult`, and the final score of the checkpoint it ends on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import TaskID

from lmlab.core.progress import progress_bar
from lmlab.data.shards import TokenShards
from lmlab.evals.evaluate import evaluate_split, spread
from lmlab.train.distributed import Parallel
from lmlab.train.step import TrainStep


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    loss_plot: Path
    stopped_by: str | None = None  # the signal that ended the run before max_iters, if any
    budget_spent: float | None = None  # seconds a budgeted run took, start-ups included (`Budget.taken`)
    budget_line: str | None = None  # how its budget held, in a sentence (`Budget.ended`)
    abandoned: bool = False  # the signal came during a step that did not end within the grace period
    saved: Path | None = None  # the newest step folder, what a resume continues from
    final: dict[str, Any] | None = None  # the final score of the checkpoint the run ended on (its `final` event)


class ScoreCut(Exception):
    """A stop signal came during the final score."""


def score_final(train_step: TrainStep, val_tokens: TokenShards, meta: dict[str, Any], batch_size: int, step: int,
                wanted: int, total: int, parallel: Parallel, console: Console,
                stopped: Callable[[], bool]) -> dict[str, Any] | None:
    """The model scored on `wanted` of the val split's `total` windows (all of them, or windows spread over it with
    their standard error), as the `final` event of the checkpoint at `step`; None where a stop signal cuts it short
    (on one process: the ranks of a job go on together)."""
    model, alone, began = train_step.model, parallel.world_size == 1, time.perf_counter()
    model.eval()
    try:
        with progress_bar(console, "val window") as bar:
            task = TaskID(bar.add_task("final score", total=min(wanted, total), info=""))

            def tick(done: int, of: int) -> None:
                bar.update(task, completed=done)
                if alone and stopped():
                    raise ScoreCut

            per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
            scores = evaluate_split(model, val_tokens, per_token, batch_size, train_step.device, train_step.dtype,
                                    tick, None if wanted >= total else spread(total, wanted),
                                    None if alone else parallel, train_step.eager)
    except ScoreCut:
        return None
    finally:
        model.train()
    return {"event": "final", "step": step, "val_loss": scores["loss"], "stderr": scores["stderr"],
            "bits_per_byte": scores["bits_per_byte"], "windows": min(wanted, total), "split_windows": total,
            "tokens": scores["tokens"], "seconds": round(time.perf_counter() - began, 3)}
