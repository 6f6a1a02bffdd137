"""What a training run reports: as it goes (`Reports`, a part of the `Trainer`), its train and eval lines with their
events, its threads' changes and its end event; at its end, its `TrainResult` and the final score of the checkpoint it
ends on (`score_final`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import TaskID

from lmlab.core.humanize import format_duration
from lmlab.core.peak import Peak
from lmlab.core.progress import progress_bar
from lmlab.core.threads import Choice
from lmlab.data.shards import TokenShards
from lmlab.evals.evaluate import evaluate_split, spread
from lmlab.train.distributed import Parallel
from lmlab.train.estimate import Estimate
from lmlab.train.preflight import Job
from lmlab.train.state import Means, Progress, Stopwatch, Throughput
from lmlab.train.step import TrainStep
from lmlab.train.stop import Writes


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    loss_plot: Path
    stopped_by: str | None = None  # the signal that ended the run before max_iters, if any
    budget_spent: float | None = None  # seconds a budgeted run took, start-ups included (`Budget.end`)
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
                                    None if alone else parallel, train_step.scoring)
    except ScoreCut:
        return None
    finally:
        model.train()
    return {"event": "final", "step": step, "val_loss": scores["loss"], "stderr": scores["stderr"],
            "bits_per_byte": scores["bits_per_byte"], "windows": min(wanted, total), "split_windows": total,
            "tokens": scores["tokens"], "seconds": round(time.perf_counter() - began, 3)}


@dataclass
class Reports:
    """The lines and events of a run, a part the `Trainer` holds: its train and eval lines and their events, its
    threads' changes and its end event, of its `job` (what a step is) from the parts it is given (`progress`, `means`,
    `clock`, `throughput`: the state they read). `peak` is what MFU divides by, None once a step outran it; `doing`
    says what the run does in a line about its threads (training, fine-tuning)."""

    job: Job
    writes: Writes
    progress: Progress
    means: Means
    clock: Stopwatch
    throughput: Throughput
    peak: Peak | None
    doing: str
    evaluation: float = 0.0  # the seconds the newest evaluation took, which a budget prices its final score by

    def threads(self, choice: Choice) -> None:
        """A change of the run's threads: its event and line."""
        self.writes.log(choice.record(self.progress.step))
        style = "yellow" if choice.lowered else "default"
        self.job.console.print(f"step {self.progress.step}: {self.doing} on "
                               f"{choice.describe(self.job.machine.threads.override)}",
                           style=style, highlight=False)

    def evaluated(self, train_estimate: Estimate | None, val_estimate: Estimate, seconds: float) -> bool:
        """The eval event and line (a fine-tune scores no train split: `train_estimate` None); whether it is a new
        best."""
        p, tc = self.progress, self.job.cfg.train
        train_eval, val = None if train_estimate is None else train_estimate.loss, val_estimate.loss
        is_best = val < p.best_val_loss
        if is_best:
            p.best_val_loss, p.best_step, p.evals_since_best = val, p.step, 0
        else:
            p.evals_since_best += 1
        avg_train, self.evaluation = self.means["eval"].pop_mean(), seconds
        self.writes.log({"event": "eval", "step": p.step, "tokens": p.tokens, "epoch": self.epoch(),
                         "elapsed": round(self.clock.elapsed, 3), "train_loss": avg_train,
                         "train_eval_loss": train_eval, "val_loss": val, "val_accuracy": val_estimate.accuracy,
                         "best_val_loss": p.best_val_loss, "is_best": is_best, "seconds": round(seconds, 3)})
        self.writes.redraw()  # kept current, so a long run can be watched
        mark = " | [bold green]best![/bold green]" if is_best else ""
        # Two train losses, two names: the mean of the training steps, and the train split scored as val is.
        when = f"step {p.step}" if tc.passes_per_eval is None else f"epoch {self.epoch():.2f}"
        scored = "" if train_eval is None else f" | train (eval) {train_eval:.4f}"
        self.job.console.print(f"{when} | train (steps) {avg_train:.4f}{scored} | val {val:.4f}{mark}")
        p.stopped_early = bool(tc.patience) and p.evals_since_best >= tc.patience
        return is_best

    def train_line(self, lr: float, grad_norm: float) -> str:
        """A train event and its line (without ms/step, tokens/s and MFU when the only step since the last was the
        warm-up step), of the steps up to the last, at `lr`, its gradient's norm `grad_norm`."""
        p, step_seconds = self.progress, self.throughput.pop_step_seconds()
        rate = None if step_seconds is None else self.job.tokens_per_step / step_seconds
        mean, epoch, elapsed = self.means["log"].pop_mean(), self.epoch(), round(self.clock.elapsed, 3)
        # tokens/s counts every rank's tokens, against every rank's peak
        computed = None if rate is None else rate * self.job.model.flops_per_token() / self.job.parallel.world_size
        wrong = self.peak and computed and self.peak.wrong(computed)
        if wrong:
            self.job.console.print(wrong, style="yellow", highlight=False)
            self.peak = None
        mfu = None if computed is None or self.peak is None else self.peak.mfu(computed)
        self.writes.log({"event": "train", "step": p.step, "tokens": p.tokens, "epoch": epoch, "loss": mean,
                         "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": None if rate is None else round(rate, 1),
                         "ms_per_step": None if step_seconds is None else round(1000 * step_seconds, 3),
                         "mfu": None if mfu is None else round(mfu, 4), "elapsed": elapsed})
        passes = f"epoch {epoch:.2f}" + (f", {format_duration(elapsed / epoch)}/epoch" if epoch else "")
        if rate is None or step_seconds is None:  # both, or neither
            return f"loss {mean:.4f} | lr {lr:.1e} | {passes}"
        utilisation = "" if mfu is None else f" | MFU {100 * mfu:.1f}%"
        ms = 1000 * step_seconds
        pace = f"{rate:,.0f} tok/s | {ms:,.{0 if ms >= 10 else 1}f} ms/step"
        return f"loss {mean:.4f} | lr {lr:.1e} | {pace}{utilisation} | {passes}"

    def epoch(self) -> float:
        return round(self.progress.tokens / self.job.split_tokens, 4)

    def end(self, stopped_early: bool, stopped_by: str | None, lr: float, **more: Any) -> None:
        """The end event, with `more` of the run's kind."""
        p = self.progress
        self.writes.log({"event": "end", "step": p.step, "tokens": p.tokens, "elapsed": round(self.clock.elapsed, 3),
                         "lr": lr, "best_val_loss": p.best_val_loss, "best_step": p.best_step,
                         "stopped_early": stopped_early, "stopped_by": stopped_by, **more})
