"""The training loop (`Trainer`): optimizer steps one after another, each followed by what the `Cadence` says is
due (a train line, an evaluation, a checkpoint), until the schedule's last step, an early stop, a stop signal or a
failed write; on one device or under torchrun. What a run settles before its first step is in `preflight`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.progress import TaskID

from lmlab.core.compile_cache import discard_partial_builds
from lmlab.core.humanize import format_duration
from lmlab.core.progress import progress_bar
from lmlab.data.shards import windows_in
from lmlab.train.budget import NO_BUDGET, Budget, Costs, final_windows_by_steps, plan
from lmlab.train.cadence import Cadence
from lmlab.train.checkpointer import Checkpointer, from_here, trained_in
from lmlab.train.estimate import Estimate, estimate_loss
from lmlab.train.guard import SpikeGuard
from lmlab.train.preflight import Job, given_back, resume_schedule
from lmlab.train.reports import Reports, TrainResult, score_final
from lmlab.train.schedule import Schedule
from lmlab.train.state import (
    Checkpointed,
    Mean,
    Means,
    Progress,
    RngState,
    ScalerState,
    Slot,
    Stopwatch,
    Throughput,
    TrainingState,
)
from lmlab.train.stop import StepAbandoned, StopOnSignal, Writes, begun, peer_lost
from lmlab.train.timing import run_timing
from lmlab.train.tracking import Tracker


class Trainer:
    """One run of a `Job` (lmlab.train.preflight: `train_job` builds it, the run's lock held from then to the end of
    `run()`): its parts, the budget planned, the run begun, then `run()`.

    Another kind of run (lmlab.train.finetune.Finetuner) is this loop with its own `HOOKS`, and overrides nothing
    else (tests/test_finetune.py holds it): how it begins or continues, a step's tokens, its evaluation, final score,
    state and end fields."""

    HOOKS = frozenset({"_start", "_write_setup", "_restore", "_step_tokens", "_evaluate", "_score_final",
                       "_state_parts", "_end_fields"})
    DOING = "training"  # what a line about its threads calls it

    def __init__(self, job: Job):
        self.job, self.cfg, self.progress = job, job.cfg, Progress()
        with given_back(job.held, job.parallel, job.run_dir, lambda: self.progress.step):
            self._parts()
            if self.cfg.train.budget_seconds and not job.resume:
                self._plan_budget()
            self._begin()
            job.machine.say(job.console)
            if (threads := job.machine.threads.choice).lowered:
                self.reports.threads(threads)

    def _parts(self) -> None:
        """What the loop holds besides the job (a resumed run's schedule starts as its config.toml has it, which the
        checkpoint completes)."""
        job, tc = self.job, self.cfg.train
        self.clock, self.throughput = Stopwatch(), Throughput(job.machine.device)
        self.means = Means(log=Mean(), eval=Mean())  # train loss since the last log line, since the last eval
        self.guard = SpikeGuard(tc.spike_zscore, tc.spike_patience, tc.rollback_lr_factor)
        self.schedule = Schedule(job.run_dir.config().train if job.resume else tc, lambda: self.guard.lr_scale)
        self.cadence = Cadence(tc, tc.eval_steps(job.split_tokens, job.tokens_per_step), job.tokens_per_step,
                               job.split_tokens)
        self.writes = Writes(job.run_dir, job.parallel.is_main)
        self.reports = Reports(job, self.writes, self.progress, self.means, self.clock, self.throughput,
                               job.machine.peak, self.DOING)
        self._saved_plan: dict[str, Any] | None = None  # a resumed run's budget, as its checkpoint has it
        budget = Slot(lambda: self.budget.state_dict(), lambda saved: setattr(self, "_saved_plan", saved))
        # The dataset's checksum is recorded and never restored: resume compares it.
        step = job.step
        state = TrainingState(progress=self.progress, means=self.means, guard=self.guard, clock=self.clock,
                              loader=job.loader, rng=RngState(step.device), scaler=ScalerState(step.scaler),
                              dataset_sha256=Slot(lambda: job.data_sha256, lambda _: None), schedule=self.schedule,
                              budget=budget, attention=Slot(lambda: step.attention_path, step.restore_attention),
                              **self._state_parts())
        self.checkpointer = Checkpointer(job.run_dir, job.model, step.optimizer, job.parallel, state, self.writes,
                                         tc, job.console)
        self._queued: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # steps the guard has not seen
        self._grad_norm = self._lr = 0.0
        self._stop = StopOnSignal()  # installed while the loop runs

    def _state_parts(self) -> dict[str, Checkpointed]:
        """What the checkpoints keep besides the loop's state: a fine-tune's epochs."""
        return {}

    @property
    def budget(self) -> Budget:
        """The run's time budget, or one that does nothing where it trains by steps."""
        return self.schedule.budget or NO_BUDGET

    def _plan_budget(self) -> None:
        """A new run's budget planned before its first step from its own step timed now, or read back from this
        machine's cache (as `--size auto` or an earlier run of its shape timed it), every rank from the same mean
        figures; refused where its minimum does not fit, before any timing where its FLOPs alone cannot."""
        job, tc = self.job, self.cfg.train
        timing = run_timing(job.step, self.cfg, job.meta, job.parallel, job.started, job.micro_steps, job.console,
                            job.timing, job.machine.peak is not None)
        costs = Costs(*job.parallel.mean(list(dataclasses.astuple(timing.costs())), job.step.device))
        spent = job.parallel.mean([time.perf_counter() - job.started], job.step.device)[0]
        made = plan(tc.budget_seconds, spent, costs, tc, self.cadence.intervals,
                    windows_in(job.meta, "val", self.cfg.model.block_size))
        self.schedule.budget = Budget(made, self.cadence.intervals, lag=job.parallel.lag)

    def _begin(self) -> None:
        job = self.job
        begun()
        if job.resume:
            self._resume()
        else:
            self.checkpointer.start(self.cfg, job.init_from, job.keep_optimizer)
            if job.parallel.is_main:
                self._start()
                for event in (*job.events, job.machine.record()):
                    self.writes.log(event)
                self._say_budget()
        self.tracker = Tracker(self.cfg.train.tracker if job.parallel.is_main else "none", job.run_dir.path, self.cfg,
                               resume_step=self.progress.step if job.resume else None,
                               model=None if job.parallel.mode == "fsdp" else job.model)  # rank 0 cannot run shards
        self.writes.trackers.append(self.tracker)
        if job.parallel.is_main:
            self._write_setup()

    def _start(self) -> None:
        """The start event of a new run."""
        job, machine = self.job, self.job.machine
        job.run_dir.begin("trained", job.model, self.cfg, job.meta, init_from=job.init_from, device=machine.device,
                          dtype=machine.dtype, world_size=job.parallel.world_size, parallel=job.parallel.mode,
                          peak=machine.peak, dtype_reason=machine.dtype_reason)

    def _write_setup(self) -> None:
        self.job.run_dir.write_setup(self.cfg, Path(self.cfg.data.dataset) / "tokenizer.json", self.job.meta)

    def _restore(self) -> Path:
        """Restore the newest checkpoint that verifies, of this model, tokenizer and (unless forced) data."""
        return self.checkpointer.resume(self.cfg, self.job.data_sha256, self.job.force)

    def _resume(self) -> None:
        job, began = self.job, time.perf_counter()
        folder = self._restore()
        loaded, step = time.perf_counter() - began, self.progress.step
        line = resume_schedule(self.schedule, self.cadence.intervals, self.cfg.train, self._saved_plan, step,
                               job.run_dir.path, job.parallel.lag, time.perf_counter() - job.started)
        self._lr = self.schedule.lr(step - 1) if step else 0.0  # the checkpoint's step's, until one trains
        if line:
            job.console.print(line, highlight=False)
        changed = job.changed
        if job.parallel.is_main:
            job.run_dir.truncate_after(step)
            changed = {**changed, **trained_in(job.run_dir, job.step.dtype)}  # this machine's choice, a change too
            job.run_dir.resumed(step, folder.name, job.step.device, job.step.dtype, job.parallel.world_size,
                                job.machine.peak, changed)
            self.checkpointer.say_retention(self.schedule.last_step)
        took = (f"{loaded:.2f} s" if loaded < 10 else format_duration(loaded)) + from_here(changed)  # loaded
        job.console.print(f"Resumed {job.run_dir.path} from {folder.name} (step {step}) in {took}.", highlight=False)

    def run(self) -> TrainResult:
        """Train to the schedule's last step (or an early stop, a stop signal, a failed write); then the run's lock
        is released and torch's threads are what they were before the run."""
        with self.job.held, self._closed_at_end():
            try:
                return self._loop()
            except StepAbandoned as abandoned:
                if abandoned.__cause__ is not None:  # the signal made the step fail: a compiler it killed, say
                    discard_partial_builds()  # whose cut-short kernels the next compile of this process would load
                # Nothing of the abandoned step is saved: its update may be half-applied.
                self.reports.end(False, abandoned.signal, self._lr, **self._end_fields())
                return self._result(abandoned.signal, abandoned=True)

    @contextmanager
    def _closed_at_end(self) -> Iterator[None]:
        """The tracker closed and the job left however the run ends."""
        lost = None
        try:
            yield
        except RuntimeError as err:
            if (said := self.job.parallel.lost(err)) is None:
                raise
            lost = peer_lost(said, self.job.run_dir, self.progress.step)
            raise lost from None
        finally:
            self.tracker.close()
            self.job.parallel.close(failed=lost is not None)

    def _loop(self) -> TrainResult:
        p, schedule = self.progress, self.schedule
        self.job.model.train()
        self.clock.start()
        said = self.budget.describe(self.cfg.train) if self.budget.live else schedule.unreached(p.step)
        if said:  # the budget's plan, or a note on what of the schedule cannot take effect
            self.job.console.print(said, style=None if self.budget.live else "yellow", highlight=False)
        with self._stop as stop:
            with progress_bar(self.job.console) as bar:
                task = TaskID(bar.add_task("train", total=schedule.last_step, completed=p.step, info=""))
                stopping, evaluated = bool(stop.signal), p.step
                while p.step < schedule.last_step and not p.stopped_early and not stopping:
                    started = time.perf_counter()
                    self._take_step()
                    due = self.cadence.after(p.step, p.tokens, schedule.last_step)
                    # The device runs ahead (the next batch prepared meanwhile) until a point that needs the losses.
                    if due and not self._judge_queued_steps():
                        continue
                    seconds = time.perf_counter() - started
                    self.throughput.add(seconds)
                    if due.log:
                        bar.update(task, completed=p.step, info=self.reports.train_line(self._lr, self._grad_norm))
                    best = due.evaluate and self._evaluate_and_log()
                    evaluated = p.step if due.evaluate else evaluated
                    if best or due.save:
                        self.checkpointer.save(best)
                    # Agreed by all ranks: a stop (a signal, a failed write), and the seconds a budget has spent.
                    flag, spent = self.job.parallel.agree(bool(stop.signal) or self.writes.error is not None,
                                                          time.perf_counter() - self.job.started)
                    stopping = bool(flag)
                    if changed := self.job.machine.threads.stepped(seconds):  # the threads' look at the load
                        self.reports.threads(changed)
                    self.budget.after_step(p.step, spent)
                    self._say_budget()
                    bar.update(task, completed=p.step, total=schedule.last_step)
                # The last step is always evaluated (a budget may decide only after a step that it was the last; the
                # plan kept the time) and saved, again where the budget decided after its save, unless a stop came
                # first or a write failed, which leaves the newest checkpoint as it is.
                self._judge_queued_steps()
                failed = self.job.parallel.any(self.writes.error is not None)
                best = evaluated != p.step and not stopping and not failed and self._evaluate_and_log()
                if (best or self.checkpointer.saved_step != p.step or self.budget.at_once) and not failed:
                    self.checkpointer.save(best)
            final = None
            if not stopping and not failed and not self.job.parallel.any(bool(stop.signal)):  # every rank, or none
                final = self._score_final(lambda: bool(stop.signal))
        if failed:
            raise self.writes.failure(p.step)
        return self._finish(stop.signal, final)

    def _take_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches, queued for the guard without a host sync."""
        p = self.progress
        self._lr = lr = self.schedule.lr(p.step)
        with self._stop.interruptible():
            batches = self.job.parallel.micro_batches(self.job.loader, self.cfg.train.grad_accum_steps)
            total, norm = self.job.step(batches, self.job.micro_steps, lr)
        p.step, p.tokens = p.step + 1, p.tokens + self._step_tokens()
        self._queued.append((p.step, lr, total, norm))

    def _step_tokens(self) -> int:
        """The tokens of the step just taken: every step's are the same (a fine-tune's are not)."""
        return self.job.tokens_per_step

    def _judge_queued_steps(self) -> bool:
        """Let the guard judge the queued steps in order (one host sync for all) and keep the means; False if it rolled
        the run back."""
        queued, self._queued = self._queued, []
        read = torch.stack([x for *_, total, norm in queued for x in (total, norm)]).tolist() if queued else []
        for (step, lr, _, _), loss, grad_norm in zip(queued, read[::2], read[1::2]):
            verdict = self.guard.judge(loss, grad_norm, scaled=self.job.step.scaler.is_enabled())
            if verdict in ("skip", "spike"):
                self.writes.log({"event": verdict, "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr})
            if verdict == "rollback":
                self.checkpointer.rollback(step, self.guard.lr_scale)
                return False
            if verdict != "skip":  # a non-finite loss would poison the means
                self.means.add(loss)
            self._grad_norm = grad_norm
        return True

    def _say_budget(self) -> None:
        """What the budget's newest plan or decision changed, logged and said."""
        if self.budget.event:
            self.writes.log({"event": "budget", **dataclasses.asdict(self.budget.event)})
        if self.budget.line:
            self.job.console.print(self.budget.line, style="yellow", highlight=False)

    def _evaluate_and_log(self) -> bool:
        """Whether the evaluation is a new best."""
        began = time.perf_counter()
        train_eval, val = self._evaluate()
        return self.reports.evaluated(train_eval, val, time.perf_counter() - began)

    def _score_final(self, stopped: Callable[[], bool]) -> dict[str, Any] | None:
        """The checkpoint the run ends on, scored on the val split (`score_final`), the figure a run ends with rather
        than its best estimate (the least of many noisy ones): the windows that what is left of its budget holds
        (`Budget.final_windows`); in a run by steps, `final_windows_by_steps`."""
        tc, p, T = self.cfg.train, self.progress, self.cfg.model.block_size
        total = windows_in(self.job.meta, "val", T)
        if self.budget.plan.final_windows:
            # Every rank from the same seconds, so that all run as many forwards.
            spent, evaluation = self.job.parallel.mean([time.perf_counter() - self.job.started,
                                                        self.reports.evaluation], self.job.step.device)
            wanted = self.budget.final_windows(tc.batch_size, spent, evaluation)
        else:
            wanted = final_windows_by_steps(total, tc.batch_size, T, p.tokens)
        final = score_final(self.job.step, self.job.splits["val"], self.job.meta, tc.batch_size, p.step, wanted, total,
                            self.job.parallel, self.job.console, stopped)
        if final:
            self.writes.log(final)
        return final

    def _evaluate(self) -> tuple[Estimate | None, Estimate]:
        tc, step = self.cfg.train, self.job.step
        batches = self.budget.plan.eval_iters or tc.eval_iters
        self.job.model.eval()
        # Fixed seeds: every eval scores the same batches, so curves move only because the model did.
        with self._stop.interruptible():
            train, val = (estimate_loss(step.scoring, tokens, self.cfg.model.block_size, tc.batch_size, batches,
                                        tc.seed + offset, step.device, step.dtype, self.job.parallel)
                          for offset, tokens in ((1, self.job.splits["train"]), (2, self.job.splits["val"])))
        self.job.model.train()
        return train, val

    def _finish(self, stopped_by: str | None, final: dict[str, Any] | None) -> TrainResult:
        p = self.progress
        self.writes.redraw()
        spent, line = self.budget.end(time.perf_counter() - self.job.started)
        self.reports.end(p.stopped_early, stopped_by, self._lr, budget_seconds=self.budget.plan.seconds or None,
                         budget_spent=spent, **self._end_fields())
        if self.writes.error is not None:
            raise self.writes.failure(p.step)
        return self._result(stopped_by, budget_spent=spent, budget_line=line, final=final)

    def _end_fields(self) -> dict[str, Any]:
        """What the end event adds of this kind of run: nothing of a run trained (a fine-tune's epochs)."""
        return {}

    def _result(self, stopped_by: str | None, **more: Any) -> TrainResult:
        """What the run ended with, its newest step folder (what a resume continues from) among it."""
        p, saved = self.progress, self.job.run_dir.step_folders()
        return TrainResult(self.job.run_dir.path, p.best_val_loss, p.best_step, p.step, p.stopped_early,
                           self.job.run_dir.loss_plot, stopped_by, saved=saved[-1] if saved else None, **more)
