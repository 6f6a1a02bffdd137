"""The training loop: the configured optimizer and LR schedule, grad accumulation and clipping (`TrainStep`),
periodic eval, early stopping, best/latest checkpoints with exact resume (lmlab.train.resume), a loss-spike/NaN
guard, a time budget (lmlab.train.steering), metrics and a live progress bar, on one device or under torchrun."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.analysis.plots import plot_losses
from lmlab.core.config import RunConfig, TrainConfig, to_dict
from lmlab.core.device import configure, synchronize
from lmlab.core.errors import PeerLost, UserError
from lmlab.core.fileio import WriteError
from lmlab.core.humanize import format_duration
from lmlab.core.peak import Peak, choose_dtype, emulated_warning, peak_flops
from lmlab.core.progress import progress_bar
from lmlab.core.threads import Choice, ThreadChooser, forward_probe
from lmlab.data.loader import BatchLoader, check_block_size, open_tokens
from lmlab.data.shards import read_meta, row_layout
from lmlab.model import build_model
from lmlab.model.memory import check_training
from lmlab.run.rundir import RunDir
from lmlab.train.budget import BudgetClock, BudgetPlan, schedule_for
from lmlab.train.distributed import elastic_restart, from_env, setup
from lmlab.train.estimate import estimate_loss
from lmlab.train.guard import SpikeGuard
from lmlab.train.optim import lr_at
from lmlab.train.resume import Resuming, check_resumable
from lmlab.train.schedule import Relaid
from lmlab.train.state import Mean, Progress, Stopwatch
from lmlab.train.steering import Steering
from lmlab.train.step import TrainStep
from lmlab.train.stop import StepAbandoned, StopOnSignal, write_failure
from lmlab.train.tracking import Tracker


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    loss_plot: Path
    stopped_by: str | None = None  # the signal that ended the run before max_iters, if any
    budget_spent: float | None = None  # seconds from the process's start to the end, of a budget it planned
    abandoned: bool = False  # the signal came during a step that did not end within the grace period
    saved: Path | None = None  # the newest step folder, what a resume continues from


def resolve_config(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Fill model.vocab_size from the dataset and check that a given one covers its ids (an imported model may
    have more embedding rows than its tokenizer has tokens, as Qwen3's do), that model.block_size fits the
    rows of a row-packed dataset, and set train.eval_interval of evaluations spaced by passes (train.eval_every)."""
    meta = read_meta(Path(cfg.data.dataset))
    check_block_size(row_layout(meta), cfg.model.block_size, f"dataset {cfg.data.dataset}")
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but dataset {cfg.data.dataset} has {meta['vocab_size']} "
            "tokens, more than the model has rows for; point data.dataset at a dataset of the run's tokenizer."
        )
    tc = cfg.train  # evaluations by passes: eval_interval is the steps nearest them
    steps = tc.eval_steps(meta["train"]["tokens"], tc.batch_size * tc.grad_accum_steps * cfg.model.block_size)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, eval_interval=steps))
    return cfg, meta


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # by index, as rank 0 tells the others


class Trainer(Steering, Resuming):
    """One run: build from a config, optionally resume or start from another run's weights, then `run()`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device: str = "auto", resume: bool = False,
                 console: Console | None = None, force: bool = False, init_from: str | None = None,
                 keep_optimizer: bool = False, started: float | None = None):
        # A train.budget_seconds run counts from `started`, a time.perf_counter() reading (the CLI passes its own
        # start), else from `run()`: so the trials of a sweep, in one process, compare on equal terms.
        self.started = started
        self.run_dir = RunDir(run_dir)
        job = from_env()
        job.local_steps(cfg.train.grad_accum_steps)  # checked before the job's processes connect to each other
        # Made before the set-up, whose load tells a quiet machine; each torchrun rank would time its own threads.
        self.threads = ThreadChooser(cfg.train.threads, "train.threads",
                                     fixed="torchrun" if job.world_size > 1 else None)
        if job.is_main:
            self.run_dir.lock()  # before anything of the run is read: one writer at a time, released by run()
        try:
            self._build(cfg, device, resume, console, force, init_from, keep_optimizer)
        except BaseException as err:
            self.run_dir.unlock()
            if (lost := self._lost(err)) is not None:
                raise lost from None
            raise

    def _build(self, cfg: RunConfig, device: str, resume: bool, console: Console | None, force: bool,
               init_from: str | None, keep_optimizer: bool) -> None:
        if resume:
            check_resumable(self.run_dir, cfg.data.dataset)
        self.cfg, self.meta = resolve_config(cfg)
        self.parallel, self.device = setup(device, cfg.train.collective_timeout)
        self.console = console or Console()
        if not self.parallel.is_main:
            self.console.quiet = True  # one voice for the whole job (the CLI's console too)
        tc, mc = self.cfg.train, self.cfg.model
        torch.manual_seed(tc.seed)
        configure(self.device)
        self.dtype, self.dtype_reason, self.peak = self._measure_hardware(tc.dtype)
        self.micro_steps = self.parallel.local_steps(tc.grad_accum_steps)  # this rank's share of each step
        # Every byte training reads, against meta.json's checksums, before the model is built or the run is begun.
        with self.console.status(f"Checking {cfg.data.dataset} against its meta.json..."):
            self.train_tokens = open_tokens(Path(cfg.data.dataset), "train", self.meta["dtype"])
            self.val_tokens = open_tokens(Path(cfg.data.dataset), "val", self.meta["dtype"])
        self._check_same_inputs()
        check_training(mc, tc.batch_size, tc.optimizer, self.device, self.parallel.local_world_size)
        self.model = build_model(mc).to(self.device)  # the same initial weights on every rank
        self.parallel.own_rng(tc.seed, 0)
        self.step = TrainStep(self.model, tc, self.device, self.dtype, self.parallel.wrap(self.model, tc.parallel,
                              self.dtype), self.parallel.reduce_step)
        if self.step.note:
            self.console.print(f"[yellow]{self.step.note}[/yellow]")
        threads = self.threads.choose(forward_probe(self.model, tc.batch_size, mc.block_size, self.device,
                                                    self.dtype), self.device)
        self.loader = BatchLoader(self.train_tokens, mc.block_size, tc.batch_size, tc.seed, "train", self.device)
        BatchLoader(self.val_tokens, mc.block_size, tc.batch_size, tc.seed, "val")  # checks the split is long enough
        self.flops_per_token = self.model.flops_per_token()
        self.split_tokens = self.meta["train"]["tokens"]  # what a pass over the data is
        # The parts of the state a checkpoint holds, each restored in place (see `_restore`).
        self.progress, self.clock = Progress(), Stopwatch()
        self.means = {"log": Mean(), "eval": Mean()}  # train loss since the last log line, since the last eval
        self.guard = SpikeGuard(tc.spike_zscore, tc.spike_patience, tc.rollback_lr_factor)
        self.budget = BudgetPlan(tc.budget_seconds)  # fixed by a budgeted run after timing its first steps
        self.relaid: Relaid | None = None  # the schedule of a run resumed with another length (train/schedule.py)
        self._saved_step = -1  # the step of the newest checkpoint written by this process
        self._write_error: WriteError | None = None  # a failed write of rank 0, which ends the run (see `_write`)
        self._pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # steps the guard has not seen
        self._grad_norm = 0.0  # of the newest judged step, for the log
        self._lr = 0.0  # of the newest step, for the log
        self._stop = StopOnSignal()  # what a stop signal may interrupt: installed while the loop runs
        # A torchrun worker restarted after a failure (--max-restarts) runs the same command: it continues, and so do
        # the workers of a host started again beside it, which its own launcher never restarted.
        resume = resume or (self.parallel.any(elastic_restart()) and bool(self.run_dir.step_folders()))
        if resume:
            self._resume(force)
        else:
            self._start(init_from, keep_optimizer)
        self.schedule = schedule_for(self.cfg.train, self.budget)  # the steps and LR the loop goes by
        self.tracker = Tracker(tc.tracker if self.parallel.is_main else "none", self.run_dir.path, self.cfg,
                               resume_step=self.progress.step if resume else None,
                               model=None if self.parallel.mode == "fsdp" else self.model)  # rank 0 cannot run shards
        if self.parallel.is_main:
            self.run_dir.write_setup(self.cfg, Path(self.cfg.data.dataset) / "tokenizer.json", self.meta)
        if threads.lowered:
            self._threads_changed(threads)

    def _check_same_inputs(self) -> None:
        """Under torchrun, refuse before the first step a job whose hosts were started with different configs or
        read different datasets (its path may differ from host to host, not its content)."""
        settings = {f"{section}.{key}": value for section, fields in to_dict(self.cfg).items()
                    for key, value in fields.items() if f"{section}.{key}" != "data.dataset"}
        self.parallel.check_same("config", settings, "start every host with the same config and --set options")
        self.parallel.check_same("dataset", {"train split sha256": self.train_tokens.sha256,
                                             "val split sha256": self.val_tokens.sha256},
                                 "every host must read the same dataset: keep it on the filesystem they share")

    def _lost(self, err: BaseException) -> PeerLost | None:
        """The sentence a job ends with when a collective failed because another process died or stopped answering
        (None for any other error): who was lost, and how to continue."""
        said = hasattr(self, "parallel") and self.parallel.lost(err)
        if not said:
            return None
        saved = self.run_dir.step_folders()
        step = getattr(self, "progress", None) and self.progress.step
        when = f"after step {step}" if step else "during start-up"
        again = (f"its newest checkpoint ({saved[-1].name}) is whole: once every host is up and reaches the others, "
                 f"run `lmlab train --resume {self.run_dir.path}` on each under the same torchrun command "
                 "(with --max-restarts, torchrun continues on its own when the host joins again)" if saved else
                 "no checkpoint was written yet: once every host is up and reaches the others, run the same command "
                 "on each again")
        return PeerLost(f"{said} {when}; {again}.")

    def _measure_hardware(self, setting: str) -> tuple[torch.dtype, str, Peak | None]:
        """The autocast dtype (on a CPU, `auto` chooses by measurement), why, and the peak MFU divides by, each said
        in a line. Under torchrun rank 0 measures while the other ranks wait, so none loads the cores it measures,
        and every rank takes rank 0's dtype."""
        self.parallel.barrier()
        dtype, why, peak, slow = torch.float32, "", None, None
        if self.parallel.is_main:
            dtype, why = choose_dtype(self.device, setting)
            peak, slow = peak_flops(self.device, dtype), emulated_warning(self.device, dtype)
        self.parallel.barrier()
        dtype = DTYPES[self.parallel.from_main(DTYPES.index(dtype))]
        self.console.print(f"dtype {str(dtype).removeprefix('torch.')} ({why})")
        if slow:
            self.console.print(slow, style="yellow", highlight=False)
        if peak is not None:
            for note in peak.notes:
                self.console.print(f"[yellow]note: {note}[/yellow]")
            self.console.print(peak.standing(), style=None if peak.quiet and peak.native else "yellow",
                               highlight=False)
        return dtype, why, peak

    def _threads_changed(self, choice: Choice) -> None:
        """Say and log threads lowered at the start, or changed by a check as the run goes."""
        self._log(choice.record(self.progress.step))
        style = "yellow" if choice.lowered else "default"
        self.console.print(f"step {self.progress.step}: training on {choice.describe('train.threads')}", style=style,
                           highlight=False)

    def _write(self, write: Callable[..., Any], *args: Any) -> None:
        """Rank 0 writes; a failed write (a full disk) ends the run like a stop signal, after the step, keeping the
        newest checkpoint, and nothing more is written meanwhile (`_finish` says what happened)."""
        if self.parallel.is_main and self._write_error is None:
            try:
                write(*args)
            except WriteError as err:
                self._write_error = err

    def _log(self, event: dict[str, Any]) -> None:
        self._write(self.run_dir.log, event)
        self._write(self.tracker.log, event)

    def _train_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches, queued for the guard without a host sync."""
        tc, step = self.schedule, self.progress.step
        self._lr = lr = self._lr_at(step, self.cfg.train) * self.guard.lr_scale
        with self._stop.interruptible():
            total, norm = self.step(self.parallel.micro_batches(self.loader, tc.grad_accum_steps), self.micro_steps,
                                    lr)
        self._pending.append((step + 1, lr, total, norm))

    def _lr_at(self, step: int, train: TrainConfig) -> float:
        """The LR of `step` under `train`: a budget's plan, a resumed run's re-laid schedule, or the config's own."""
        if train.budget_seconds:
            return self.budget.lr(step, train)
        return self.relaid.lr(step, train) if self.relaid else lr_at(step, train)

    def _judge_pending(self) -> bool:
        """Read the queued steps' loss and grad norm (one host sync for all of them), let the guard judge
        them in order and keep the means; False if the guard rolled the run back."""
        pending, self._pending = self._pending, []
        for step, lr, total, norm in pending:
            loss, grad_norm = total.item(), norm.item()
            verdict = self.guard.judge(loss, grad_norm, scaled=self.step.scaler.is_enabled())
            if verdict in ("skip", "spike"):
                self._log({"event": verdict, "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr})
            if verdict == "rollback":
                self._rollback(step)  # the steps queued after it belong to the discarded history
                return False
            if verdict != "skip":  # a non-finite loss would poison the means
                for mean in self.means.values():
                    mean.add(loss)
            self._grad_norm = grad_norm
        return True

    def _evaluate(self, n_batches: int | None = None) -> tuple[float, float]:
        tc = self.cfg.train
        self.model.eval()
        # Fixed seeds: every eval scores the same batches, so curves move only because the model did.
        with self._stop.interruptible():
            train, val = (estimate_loss(self.step.forward, tokens, self.cfg.model.block_size, tc.batch_size,
                                        n_batches or tc.eval_iters, tc.seed + offset, self.device, self.dtype,
                                        self.parallel)
                          for offset, tokens in ((1, self.train_tokens), (2, self.val_tokens)))
        self.model.train()
        return train, val

    def _after_eval(self, train_eval: float, val: float, seconds: float) -> bool:
        """Log an eval (its train loss: the mean since the last eval; how long it took) and return whether it is a
        new best."""
        p, tc = self.progress, self.cfg.train
        is_best = val < p.best_val_loss
        if is_best:
            p.best_val_loss, p.best_step, p.evals_since_best = val, p.step, 0
        else:
            p.evals_since_best += 1
        avg_train = self.means["eval"].take()
        self._log({"event": "eval", "step": p.step, "tokens": p.tokens, "epoch": self._epoch(),
                   "elapsed": round(self.clock.elapsed, 3), "train_loss": avg_train, "train_eval_loss": train_eval,
                   "val_loss": val, "best_val_loss": p.best_val_loss, "is_best": is_best, "seconds": round(seconds, 3)})
        self._write(plot_losses, self.run_dir)  # kept current, so a long run can be watched while it goes
        mark = " | [bold green]best![/bold green]" if is_best else ""
        # Two train losses, two names: the mean of the training steps, and the train split scored as val is.
        # Spaced by passes, an evaluation is named by its epoch (its step is in the train line and `lmlab log`).
        when = f"step {p.step}" if tc.passes_per_eval is None else f"epoch {self._epoch():.2f}"
        self.console.print(f"{when} | train (steps) {avg_train:.4f} | train (eval) {train_eval:.4f} | val {val:.4f}"
                           f"{mark}")
        p.stopped_early = bool(tc.patience) and p.evals_since_best >= tc.patience
        return is_best

    def _log_train(self, rate: float | None) -> str:
        """A train line; `rate` is None when the only step since the last line was the warm-up step."""
        p = self.progress
        mean, lr, epoch = self.means["log"].take(), self._lr, self._epoch()
        # tokens/s counts every rank's tokens, against every rank's peak; none against a peak measured busy
        computed = None if rate is None else rate * self.flops_per_token / self.parallel.world_size
        wrong = self.peak and computed and self.peak.wrong(computed)
        if wrong:
            self.console.print(wrong, style="yellow", highlight=False)
            self.peak = None  # no MFU for the rest of the run
        mfu = None if computed is None or self.peak is None else self.peak.mfu(computed)
        self._log({"event": "train", "step": p.step, "tokens": p.tokens, "epoch": epoch, "loss": mean,
                   "lr": lr, "grad_norm": self._grad_norm,
                   "tokens_per_sec": None if rate is None else round(rate, 1),
                   "mfu": None if mfu is None else round(mfu, 4), "elapsed": round(self.clock.elapsed, 3)})
        # Wall time per pass, evaluations included: what a write-up derives from wall time and passes.
        passes = f"epoch {epoch:.2f}" + (f", {format_duration(self.clock.elapsed / epoch)}/epoch" if epoch else "")
        if rate is None:
            return f"loss {mean:.4f} | lr {lr:.1e} | {passes}"
        utilisation = "" if mfu is None else f" | MFU {100 * mfu:.1f}%"
        return f"loss {mean:.4f} | lr {lr:.1e} | {rate:,.0f} tok/s{utilisation} | {passes}"

    def _eval_due(self, tokens_per_step: int) -> bool:
        """Whether the step just taken is evaluated: every eval_interval steps, or spaced by passes
        (train.eval_every), the first step past each (eval_interval, the steps nearest, is what a budget plans
        with), so evaluations never drift from the passes they stand for."""
        passes = self.cfg.train.passes_per_eval
        if passes is None:
            return self.progress.step % self.schedule.eval_interval == 0
        tokens, unit = self.progress.tokens, passes * self.split_tokens
        return math.floor(tokens / unit) > math.floor((tokens - tokens_per_step) / unit)

    def _epoch(self) -> float:
        """Passes over the train split so far: tokens seen over the split's tokens."""
        return round(self.progress.tokens / self.split_tokens, 4)

    def run(self) -> TrainResult:
        """Train to max_iters (or early stop, max_seconds, a stop signal, a failed write); then the run's lock is
        released."""
        lost = None
        try:
            return self._loop()
        except StepAbandoned as abandoned:
            return self._abandon(abandoned.signal)
        except RuntimeError as err:
            if (lost := self._lost(err)) is None:
                raise
            raise lost from None
        finally:
            self.tracker.close()
            self.parallel.close(failed=lost is not None)
            self.run_dir.unlock()

    def _loop(self) -> TrainResult:
        p = self.progress
        self.model.train()
        tokens_per_step = self.cfg.train.batch_size * self.cfg.train.grad_accum_steps * self.cfg.model.block_size
        self.clock.start()
        steering = self._steering()  # a budget this process plans: its steps timed, then its end steered
        step_seconds, timed_steps = 0.0, 0  # time in training steps (not evals) since the last log line
        # The first step of a process compiles, allocates and warms caches (a minute for GPT-2 under
        # torch.compile): it is left out of tokens/s and MFU, on a first start and on every resume.
        warm = False
        out_of_time = False  # train.max_seconds reached: the step that crosses it ends with an eval
        with progress_bar(self.console) as bar, self._stop as stop:
            task = bar.add_task("train", total=self._bar_total(steering), completed=p.step, info="")
            # a stop signal or a failed write, agreed by all ranks; or a budget start-up took
            stopping = self.budget.reason == "start-up"
            while p.step < self.schedule.max_iters and not p.stopped_early and not out_of_time and not stopping:
                started = time.perf_counter()
                self._train_step()
                p.step, p.tokens = p.step + 1, p.tokens + tokens_per_step
                # Agreed by all ranks, as the eval that running out of time triggers is collective, and a budget's
                # plan must be the same everywhere.
                stopping, out_of_time, steer = self.parallel.agree(
                    bool(stop.signal) or self._write_error is not None,
                    bool(self.schedule.max_seconds) and self.clock.elapsed >= self.schedule.max_seconds,
                    steering is not None and steering.due())
                if steer:
                    self._steer(steering, "pace")
                    bar.update(task, total=self.schedule.max_iters)
                tc = self.schedule
                logging = p.step % tc.log_interval == 0
                evaluating = self._eval_due(tokens_per_step) or p.step == tc.max_iters or out_of_time
                saving = p.step % tc.checkpoint_interval == 0
                # The device runs ahead (and the next batch is prepared meanwhile) until a point that needs
                # the losses: a log line, an eval, a checkpoint.
                if (logging or evaluating or saving) and not self._judge_pending():
                    continue
                seconds = time.perf_counter() - started
                if warm:
                    step_seconds, timed_steps = step_seconds + seconds, timed_steps + 1
                else:
                    synchronize(self.device)  # so none of its device work is timed with the next step
                    warm = True
                if logging:
                    info = self._log_train(tokens_per_step * timed_steps / step_seconds if timed_steps else None)
                    bar.update(task, completed=p.step, info=info)
                    step_seconds, timed_steps = 0.0, 0
                best = evaluating and self._evaluated(steering)
                if best or saving:
                    self._timed_checkpoint(best, steering)
                self._stepped(steering, seconds)
                bar.update(task, completed=p.step, total=self._bar_total(steering))
            # The end, an early stop or a signal (whenever in the step it came): the last step is always saved,
            # unless a write failed, which leaves the newest checkpoint as it is.
            self._judge_pending()
            failed = self.parallel.any(self._write_error is not None)
            if self._saved_step != p.step and not failed:
                self._checkpoint(best=False)
        if failed:
            raise write_failure(self._write_error, self.run_dir.path, p.step, self.run_dir.step_folders())
        return self._finish(stop.signal, steering)

    def _log_end(self, stopped_early: bool, stopped_by: str | None, **more: Any) -> None:
        p = self.progress
        self._log({"event": "end", "step": p.step, "tokens": p.tokens, "elapsed": round(self.clock.elapsed, 3),
                   "best_val_loss": p.best_val_loss, "best_step": p.best_step, "stopped_early": stopped_early,
                   "stopped_by": stopped_by, **more})

    def _abandon(self, signal_name: str) -> TrainResult:
        """End a run whose step was abandoned after a stop signal: nothing of that step is saved (its update may be
        half-applied), the newest checkpoint stays what a resume continues from."""
        p = self.progress
        self._log_end(False, signal_name)
        saved = self.run_dir.step_folders()
        return TrainResult(self.run_dir.path, p.best_val_loss, p.best_step, p.step, False, self.run_dir.loss_plot,
                           signal_name, abandoned=True, saved=saved[-1] if saved else None)

    def _finish(self, stopped_by: str | None, steering: BudgetClock | None) -> TrainResult:
        p = self.progress
        self._write(plot_losses, self.run_dir)
        spent = steering and round(steering.spent(), 3)  # of a budget this process planned, at its end
        self._log_end(p.stopped_early, stopped_by, budget_spent=spent)
        if self._write_error is not None:
            raise write_failure(self._write_error, self.run_dir.path, p.step, self.run_dir.step_folders())
        return TrainResult(self.run_dir.path, p.best_val_loss, p.best_step, p.step, p.stopped_early,
                           self.run_dir.loss_plot, stopped_by, spent)
