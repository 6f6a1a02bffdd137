"""The training loop (`Trainer`): optimizer steps one after another, each followed by what the `Cadence` says is
due (a train line, an evaluation, a checkpoint), until the schedule's last step, an early stop, a stop signal or a
failed write; on one device or under torchrun. What a run settles before its first step is in `preflight`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import TaskID

from lmlab.core.compile_cache import discard_partial_builds
from lmlab.core.config import RunConfig
from lmlab.core.device import configure
from lmlab.core.errors import PeerLost
from lmlab.core.humanize import format_duration
from lmlab.core.progress import progress_bar
from lmlab.core.threads import Choice, ThreadChooser
from lmlab.data.loader import Batches, BatchLoader, open_tokens
from lmlab.data.shards import windows_in
from lmlab.model.memory import check_training, fit_micro_batch
from lmlab.run.rundir import RunDir
from lmlab.train.budget import NO_BUDGET, Budget, Costs, final_windows_by_steps, plan
from lmlab.train.cadence import Cadence
from lmlab.train.checkpointer import Checkpointer, check_resumable, from_here, trained_in
from lmlab.train.distributed import elastic_restart, from_env, setup
from lmlab.train.estimate import Estimate, estimate_loss
from lmlab.train.guard import SpikeGuard
from lmlab.train.optim import optimizer_of
from lmlab.train.preflight import (
    Sized,
    check_same_inputs,
    measure_hardware,
    resolve_config,
    resume_schedule,
    say_hardware,
    weights_born_in,
)
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
from lmlab.train.step import TrainStep
from lmlab.train.stop import StepAbandoned, StopOnSignal, Writes, begun, peer_lost
from lmlab.train.timing import Timing, run_timing
from lmlab.train.tracking import Tracker


class Trainer:
    """One run: built from a config (a new run, one resumed, or one from another run's weights), then `run()`. The
    run's lock is held from the construction to the end of `run()`.

    `started` is the time.perf_counter() reading a budget counts from (default: now), so the trials of a sweep in
    one process compare on equal terms; `sized` is what `--size auto` settled already.

    Another kind of run (lmlab.train.finetune.Finetuner) is this loop with its own `HOOKS`, and overrides nothing
    else (tests/test_finetune.py holds it): its threads, what it builds (the model, step, batches, a step's tokens and
    a pass's), how it begins or continues, a step's tokens, its evaluation, final score, state and end fields."""

    HOOKS = frozenset({"_chooser", "_build", "_start", "_write_setup", "_restore", "_step_tokens", "_evaluate",
                       "_score_final", "_state_parts", "_end_fields"})
    DOING = "training"  # what a line about its threads calls it
    loader: Batches  # the train split's BatchLoader, or a fine-tune's records

    def __init__(self, cfg: RunConfig, run_dir: Path, device: str = "auto", resume: bool = False,
                 console: Console | None = None, force: bool = False, init_from: str | None = None,
                 keep_optimizer: bool = False, started: float | None = None, sized: Sized | None = None):
        self.started, self.sized = time.perf_counter() if started is None else started, sized
        self.run_dir = RunDir(run_dir)
        job = from_env()
        job.local_steps(cfg.train.grad_accum_steps)
        # Made before the set-up, whose load tells a quiet machine.
        self.threads = sized.machine.threads if sized else self._chooser(cfg, job.world_size)
        # Given back at the end of run() or if the construction fails: torch's threads (a process goes on after its
        # run: a notebook, the API, tests) and the run's lock.
        self._held = ExitStack()
        self._held.callback(self.threads.restore)
        self.continuing = False  # a fine-tune's command again, which goes on where it stopped
        try:
            if job.is_main:
                self._held.enter_context(self.run_dir.locked())
            cfg, self.changed = check_resumable(self.run_dir, cfg) if resume else (cfg, {})  # what --set changes
            chosen = self._build(cfg, device, console, init_from)
            # A fine-tune continued continues; so does a torchrun worker restarted after a failure (--max-restarts),
            # and the workers of a host started again beside it, which its own launcher never restarted.
            resume = resume or self.continuing or (self.parallel.any(elastic_restart())
                                                   and bool(self.run_dir.step_folders()))
            self._parts(resume)
            if self.cfg.train.budget_seconds and not resume:
                self._plan_budget(sized.timing if sized else None)
            self._begin(resume, force, init_from, keep_optimizer)
            self.machine.say(self.console)
            if chosen.lowered:
                self.reports.threads(chosen)
        except BaseException as err:
            self._held.close()
            if (lost := self._lost(err)) is not None:
                raise lost from None
            raise

    def _chooser(self, cfg: RunConfig, world_size: int) -> ThreadChooser:
        return ThreadChooser(cfg.train.threads, "train.threads", fixed="torchrun" if world_size > 1 else None)

    def _build(self, cfg: RunConfig, device: str, console: Console | None, init_from: str | None) -> Choice:
        """The job, the device and dtype, the data (every byte checked against meta.json before the model is built),
        the model and its optimizer step; the CPU threads, attention path and compile chosen by the job's machine
        (lmlab.core.machine); a step's tokens, and a pass over the train split's and its checksum."""
        self.cfg, self.meta = resolve_config(cfg, self.sized.meta if self.sized else None)
        self.parallel, self.device = setup(device, cfg.train.collective_timeout)
        self.console = console or Console()
        if not self.parallel.is_main:
            self.console.quiet = True
        tc, mc = self.cfg.train, self.cfg.model
        if cfg.train.warmup_epochs:
            self.console.print(f"warmup: {cfg.train.warmup_epochs:g} passes over the train split, {tc.warmup_iters:,} "
                               "steps", highlight=False)
        torch.manual_seed(tc.seed)
        configure(self.device)
        born = weights_born_in(self.run_dir, init_from) if self.device.type == "cuda" else None
        self.machine = self.sized.machine if self.sized else measure_hardware(self.parallel, self.device, tc.dtype,
                                                                              born, self.threads)
        say_hardware(self.machine, self.console)
        self.dtype, self.peak = self.machine.dtype, self.machine.peak
        self.cfg = dataclasses.replace(self.cfg, train=fit_micro_batch(mc, tc, optimizer_of(tc).state_bytes,
                                                                      self.device, self.parallel.world_size,
                                                                      self.console.print))
        tc = self.cfg.train
        self.micro_steps = self.parallel.local_steps(tc.grad_accum_steps)
        with self.console.status(f"Checking {cfg.data.dataset} against its meta.json..."):
            self.train_tokens = open_tokens(Path(cfg.data.dataset), "train", self.meta["dtype"], meta=self.meta)
            self.val_tokens = open_tokens(Path(cfg.data.dataset), "val", self.meta["dtype"], meta=self.meta)
        check_same_inputs(self.parallel, self.cfg, self.train_tokens.sha256, self.val_tokens.sha256)
        check_training(mc, tc.batch_size, optimizer_of(tc).state_bytes, self.device, self.parallel.local_world_size)
        # The same initial weights on every rank; under FSDP, no rank holds the whole model.
        self.model, wrapped = self.parallel.build(mc, tc.parallel, self.device, self.dtype)
        self.parallel.own_rng(tc.seed, 0)
        self._train_step(wrapped=wrapped, reduce=self.parallel.reduce_step, agree=self.parallel.from_main,
                         processes=self.parallel.local_world_size)
        threads = self.threads.choice if self.sized else self.machine.start()
        # A compiled step is built for one thread count (Dynamo guards on it): another would recompile it.
        self.threads.held = self.train_step.compiled
        self.loader = BatchLoader(self.train_tokens, mc.block_size, tc.batch_size, tc.seed, "train", self.device)
        BatchLoader(self.val_tokens, mc.block_size, tc.batch_size, tc.seed, "val")  # checks the split is long enough
        self.tokens_per_step = self.cfg.tokens_per_step  # the micro-batch fitted to memory's
        self.split_tokens, self.data_sha256 = self.meta["train"]["tokens"], self.meta["train"]["sha256"]
        return threads

    def _train_step(self, **options: Any) -> None:
        """The model's training step (`TrainStep`, with `options`), as the machine's rules build it; a line where
        `compile = "auto"` could not compile here."""
        self.train_step = TrainStep(self.model, self.cfg.train, self.machine, **options)
        if self.train_step.note:
            self.console.print(f"[yellow]{self.train_step.note}[/yellow]")

    def _parts(self, resuming: bool) -> None:
        """What the loop holds besides the model (a resumed run's schedule starts as its config.toml has it, which
        the checkpoint completes)."""
        tc = self.cfg.train
        self.progress, self.clock, self.throughput = Progress(), Stopwatch(), Throughput(self.device)
        self.means = Means(log=Mean(), eval=Mean())  # train loss since the last log line, since the last eval
        self.guard = SpikeGuard(tc.spike_zscore, tc.spike_patience, tc.rollback_lr_factor)
        self.schedule = Schedule(self.run_dir.config().train if resuming else tc, lambda: self.guard.lr_scale)
        self.cadence = Cadence(tc, tc.eval_steps(self.split_tokens, self.tokens_per_step), self.tokens_per_step,
                               self.split_tokens)
        self.writes = Writes(self.run_dir, self.parallel.is_main)
        self.reports = Reports(self.cfg, self.console, self.writes, self.parallel, self.progress, self.means,
                               self.clock, self.throughput, self.peak, self.tokens_per_step, self.split_tokens,
                               self.model.flops_per_token(), self.threads.override, self.DOING)
        self._saved_plan: dict[str, Any] | None = None  # a resumed run's budget, as its checkpoint has it
        budget = Slot(lambda: self.budget.state_dict(), lambda saved: setattr(self, "_saved_plan", saved))
        # The dataset's checksum is recorded and never restored: resume compares it.
        state = TrainingState(progress=self.progress, means=self.means, guard=self.guard, clock=self.clock,
                              loader=self.loader, rng=RngState(self.device), scaler=ScalerState(self.train_step.scaler),
                              dataset_sha256=Slot(lambda: self.data_sha256, lambda _: None), schedule=self.schedule,
                              budget=budget, attention=Slot(lambda: self.train_step.attention_path,
                                                            self.train_step.restore_attention), **self._state_parts())
        self.checkpointer = Checkpointer(self.run_dir, self.model, self.train_step.optimizer, self.parallel, state,
                                         self.writes, tc, self.console)
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

    def _plan_budget(self, timing: Timing | None) -> None:
        """A new run's budget planned before its first step from its own step timed now, or read back from this
        machine's cache (as `--size auto` or an earlier run of its shape timed it), every rank from the same mean
        figures; refused where its minimum does not fit, before any timing where its FLOPs alone cannot."""
        tc = self.cfg.train
        timing = run_timing(self.train_step, self.cfg, self.meta, self.parallel, self.started, self.micro_steps,
                            self.console, timing, self.peak is not None)
        costs = Costs(*self.parallel.mean(list(dataclasses.astuple(timing.costs())), self.device))
        spent = self.parallel.mean([time.perf_counter() - self.started], self.device)[0]
        made = plan(tc.budget_seconds, spent, costs, tc, self.cadence.intervals,
                    windows_in(self.meta, "val", self.cfg.model.block_size))
        self.schedule.budget = Budget(made, self.cadence.intervals, lag=self.parallel.lag)

    def _begin(self, resuming: bool, force: bool, init_from: str | None, keep_optimizer: bool) -> None:
        begun()
        if resuming:
            self._resume(force)
        else:
            self.checkpointer.start(self.cfg, init_from, keep_optimizer)
            if self.parallel.is_main:
                self._start(init_from)
                if self.sized:
                    self.writes.log(self.sized.event)
                self.writes.log(self.machine.record())
                self._say_budget()
        self.tracker = Tracker(self.cfg.train.tracker if self.parallel.is_main else "none", self.run_dir.path, self.cfg,
                               resume_step=self.progress.step if resuming else None,
                               model=None if self.parallel.mode == "fsdp" else self.model)  # rank 0 cannot run shards
        self.writes.trackers.append(self.tracker)
        if self.parallel.is_main:
            self._write_setup()

    def _start(self, init_from: str | None) -> None:
        """The start event of a new run."""
        self.run_dir.begin("trained", self.model, self.cfg, self.meta, init_from=init_from, device=self.device,
                           dtype=self.dtype, world_size=self.parallel.world_size, parallel=self.parallel.mode,
                           peak=self.peak, dtype_reason=self.machine.dtype_reason)

    def _write_setup(self) -> None:
        self.run_dir.write_setup(self.cfg, Path(self.cfg.data.dataset) / "tokenizer.json", self.meta)

    def _restore(self, force: bool) -> Path:
        """Restore the newest checkpoint that verifies, of this model, tokenizer and (unless `force`) data."""
        return self.checkpointer.resume(self.cfg, self.data_sha256, force)

    def _resume(self, force: bool) -> None:
        began = time.perf_counter()
        folder = self._restore(force)
        loaded, step = time.perf_counter() - began, self.progress.step
        line = resume_schedule(self.schedule, self.cadence.intervals, self.cfg.train, self._saved_plan, step,
                               self.run_dir.path, self.parallel.lag, time.perf_counter() - self.started)
        self._lr = self.schedule.lr(step - 1) if step else 0.0  # the checkpoint's step's, until one trains
        if line:
            self.console.print(line, highlight=False)
        if self.parallel.is_main:
            self.run_dir.truncate_after(step)
            self.changed |= trained_in(self.run_dir, self.dtype)  # this machine's choice, said as a change too
            self.run_dir.resumed(step, folder.name, self.device, self.dtype, self.parallel.world_size, self.peak,
                                 self.changed)
            self.checkpointer.say_retention(self.schedule.last_step)
        took = (f"{loaded:.2f} s" if loaded < 10 else format_duration(loaded)) + from_here(self.changed)  # loaded
        self.console.print(f"Resumed {self.run_dir.path} from {folder.name} (step {step}) in {took}.", highlight=False)

    def _lost(self, err: BaseException) -> PeerLost | None:
        said = self.parallel.lost(err) if hasattr(self, "parallel") else None
        return peer_lost(said, self.run_dir, getattr(self, "progress", None) and self.progress.step) if said else None

    def run(self) -> TrainResult:
        """Train to the schedule's last step (or an early stop, a stop signal, a failed write); then the run's lock
        is released and torch's threads are what they were before the run."""
        with self._held, self._closed_at_end():
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
            if (lost := self._lost(err)) is None:
                raise
            raise lost from None
        finally:
            self.tracker.close()
            self.parallel.close(failed=lost is not None)

    def _loop(self) -> TrainResult:
        p, schedule = self.progress, self.schedule
        self.model.train()
        self.clock.start()
        said = self.budget.describe(self.cfg.train) if self.budget.live else schedule.unreached(p.step)
        if said:  # the budget's plan, or a note on what of the schedule cannot take effect
            self.console.print(said, style=None if self.budget.live else "yellow", highlight=False)
        with self._stop as stop:
            with progress_bar(self.console) as bar:
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
                    flag, spent = self.parallel.agree(bool(stop.signal) or self.writes.error is not None,
                                                      time.perf_counter() - self.started)
                    stopping = bool(flag)
                    if changed := self.threads.stepped(seconds):  # the threads' look at the load
                        self.reports.threads(changed)
                    self.budget.after_step(p.step, spent)
                    self._say_budget()
                    bar.update(task, completed=p.step, total=schedule.last_step)
                # The last step is always evaluated (a budget may decide only after a step that it was the last; the
                # plan kept the time) and saved, again where the budget decided after its save, unless a stop came
                # first or a write failed, which leaves the newest checkpoint as it is.
                self._judge_queued_steps()
                failed = self.parallel.any(self.writes.error is not None)
                best = evaluated != p.step and not stopping and not failed and self._evaluate_and_log()
                if (best or self.checkpointer.saved_step != p.step or self.budget.at_once) and not failed:
                    self.checkpointer.save(best)
            final = None
            if not stopping and not failed and not self.parallel.any(bool(stop.signal)):  # every rank scores, or none
                final = self._score_final(lambda: bool(stop.signal))
        if failed:
            raise self.writes.failure(p.step)
        return self._finish(stop.signal, final)

    def _take_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches, queued for the guard without a host sync."""
        p = self.progress
        self._lr = lr = self.schedule.lr(p.step)
        with self._stop.interruptible():
            total, norm = self.train_step(self.parallel.micro_batches(self.loader, self.cfg.train.grad_accum_steps),
                                          self.micro_steps, lr)
        p.step, p.tokens = p.step + 1, p.tokens + self._step_tokens()
        self._queued.append((p.step, lr, total, norm))

    def _step_tokens(self) -> int:
        """The tokens of the step just taken: every step's are the same (a fine-tune's are not)."""
        return self.tokens_per_step

    def _judge_queued_steps(self) -> bool:
        """Let the guard judge the queued steps in order (one host sync for all) and keep the means; False if it rolled
        the run back."""
        queued, self._queued = self._queued, []
        read = torch.stack([x for *_, total, norm in queued for x in (total, norm)]).tolist() if queued else []
        for (step, lr, _, _), loss, grad_norm in zip(queued, read[::2], read[1::2]):
            verdict = self.guard.judge(loss, grad_norm, scaled=self.train_step.scaler.is_enabled())
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
            self.console.print(self.budget.line, style="yellow", highlight=False)

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
        total = windows_in(self.meta, "val", T)
        if self.budget.plan.final_windows:
            # Every rank from the same seconds, so that all run as many forwards.
            spent, evaluation = self.parallel.mean([time.perf_counter() - self.started, self.reports.evaluation],
                                                   self.device)
            wanted = self.budget.final_windows(tc.batch_size, spent, evaluation)
        else:
            wanted = final_windows_by_steps(total, tc.batch_size, T, p.tokens)
        final = score_final(self.train_step, self.val_tokens, self.meta, tc.batch_size, p.step, wanted, total,
                            self.parallel, self.console, stopped)
        if final:
            self.writes.log(final)
        return final

    def _evaluate(self) -> tuple[Estimate | None, Estimate]:
        tc = self.cfg.train
        batches = self.budget.plan.eval_iters or tc.eval_iters
        self.model.eval()
        # Fixed seeds: every eval scores the same batches, so curves move only because the model did.
        with self._stop.interruptible():
            train, val = (estimate_loss(self.train_step.scoring, tokens, self.cfg.model.block_size, tc.batch_size,
                                        batches, tc.seed + offset, self.device, self.dtype, self.parallel)
                          for offset, tokens in ((1, self.train_tokens), (2, self.val_tokens)))
        self.model.train()
        return train, val

    def _finish(self, stopped_by: str | None, final: dict[str, Any] | None) -> TrainResult:
        p = self.progress
        self.writes.redraw()
        spent, line = self.budget.end(time.perf_counter() - self.started)
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
        p, saved = self.progress, self.run_dir.step_folders()
        return TrainResult(self.run_dir.path, p.best_val_loss, p.best_step, p.step, p.stopped_early,
                           self.run_dir.loss_plot, stopped_by, saved=saved[-1] if saved else None, **more)
