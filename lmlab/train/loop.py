"""The training loop: the configured optimizer and LR schedule, grad accumulation and clipping, periodic eval,
early stopping, best/latest checkpoints with exact resume, a loss-spike/NaN guard, metrics.jsonl and a live
progress bar."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import lmlab
from lmlab.config import RunConfig, to_dict, to_toml
from lmlab.data.loader import BatchLoader, check_block_size, open_tokens
from lmlab.data.prepare import read_meta
from lmlab.data.shards import row_layout
from lmlab.device import autocast, autocast_dtype, configure, peak_flops
from lmlab.errors import UserError
from lmlab.evaluate import estimate_loss
from lmlab.fileio import atomic_write_text
from lmlab.model import LanguageModel, build_model
from lmlab.plots import plot_losses
from lmlab.runs import MetricsLog, run_config
from lmlab.scaling import flops_per_token
from lmlab.tracking import Tracker
from lmlab.train.checkpoint import prune_checkpoints, resolve, save_checkpoint
from lmlab.train.distributed import Parallel, elastic_restart, setup
from lmlab.train.guard import SpikeGuard
from lmlab.train.optim import lr_at, make_optimizer


@dataclass
class RunState:
    """Everything besides weights, optimizer and RNGs that a checkpoint must hold to continue exactly."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # wall seconds of training so far, summed over resumes
    best_val_loss: float = float("inf")
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False
    loss_since_eval: float = 0.0  # summed train loss of the steps since the last eval
    steps_since_eval: int = 0
    loss_since_log: float = 0.0
    steps_since_log: int = 0
    lr_scale: float = 1.0  # lowered by each rollback
    guard: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    loss_plot: Path
    stopped_by: str | None = None  # the signal that ended the run before max_iters, if any


def build_training(cfg: RunConfig, device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None
                   ) -> tuple[LanguageModel, Any, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model on its device, its (maybe compiled, maybe DDP- or FSDP-wrapped) forward, the optimizer and the
    fp16 grad scaler."""
    configure(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg.model).to(device)
    trained = parallel.wrap(model, cfg.train.parallel, dtype) if parallel else model
    compiled = cfg.train.compile is True or (cfg.train.compile == "auto" and device.type == "cuda")
    forward = torch.compile(trained) if compiled else trained
    optimizer = make_optimizer(model, cfg.train)
    return model, forward, optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def accumulate_gradients(forward: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         n_batches: int, device: torch.device, dtype: torch.dtype,
                         grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over micro-batches, then unscale and clip: the part of a training step that
    `lmlab bench` times too. Returns (mean loss, gradient norm) as device tensors, without a host sync."""
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            _, loss = forward(x, y)
        loss = loss / n_batches
        scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    return total, norm


def resolve_config(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Fill model.vocab_size from the dataset and check that a given one matches it, and that model.block_size
    fits the rows of a row-packed dataset."""
    meta = read_meta(Path(cfg.data.dataset))
    check_block_size(row_layout(meta), cfg.model.block_size, f"dataset {cfg.data.dataset}")
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but dataset {cfg.data.dataset} has {meta['vocab_size']} "
            "tokens; point data.dataset at the dataset this run was trained on."
        )
    return cfg, meta


def _bytes_text(state: torch.Tensor) -> str:
    """An RNG state (a uint8 tensor) as base64 text for state.json."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])


class Trainer:
    """One run: build from a config, optionally resume or start from another run's weights, then `run()`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device: str = "auto", resume: bool = False,
                 console: Console | None = None, force: bool = False, init_from: str | None = None,
                 keep_optimizer: bool = False):
        self.cfg, self.meta = resolve_config(cfg)
        self.run_dir = Path(run_dir)
        self.parallel, self.device = setup(device)
        self.console = console or Console()
        if not self.parallel.is_main:
            self.console.quiet = True  # one voice for the whole job (the CLI's console too)
        self.dtype = autocast_dtype(self.device, cfg.train.dtype)
        torch.manual_seed(cfg.train.seed)
        tc, mc = self.cfg.train, self.cfg.model
        self.micro_steps = self.parallel.local_steps(tc.grad_accum_steps)  # this rank's share of each step
        self.model, self.forward, self.optimizer, self.scaler = build_training(self.cfg, self.device,
                                                                                self.dtype, self.parallel)
        self.train_tokens = open_tokens(Path(cfg.data.dataset), "train", self.meta["dtype"])
        self.val_tokens = open_tokens(Path(cfg.data.dataset), "val", self.meta["dtype"])
        self.loader = BatchLoader(self.train_tokens, mc.block_size, tc.batch_size, tc.seed, "train",
                                  pin=self.device.type == "cuda")
        BatchLoader(self.val_tokens, mc.block_size, tc.batch_size, tc.seed, "val")  # checks the split is long enough
        self.flops_per_token = flops_per_token(self.model)
        self.peak_flops, self.peak_source = peak_flops(self.device, self.dtype)
        self.peak_flops *= self.parallel.world_size  # tokens/s counts every rank's tokens
        self.metrics = MetricsLog(self.run_dir)
        self.state = RunState()
        self._saved_step = -1  # the step of the newest checkpoint written by this process
        self._pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # steps the guard has not seen
        self._grad_norm = 0.0  # of the newest judged step, for the log
        self.guard = SpikeGuard(tc.spike_zscore, tc.spike_patience)
        # A torchrun worker restarted after a failure (--max-restarts) runs the same command: it continues.
        resume = resume or (elastic_restart() and any((self.run_dir / "checkpoints").glob("step_*")))
        if resume:
            self._resume(force)
        else:
            self._start(init_from, keep_optimizer)
        self.tracker = Tracker(tc.tracker if self.parallel.is_main else "none", self.run_dir, to_dict(self.cfg),
                               resume_step=self.state.step if resume else None)
        if self.parallel.is_main:
            atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
            # The run keeps its tokenizer and dataset facts, so it samples and evaluates after the dataset is gone.
            shutil.copyfile(Path(self.cfg.data.dataset) / "tokenizer.json", self.run_dir / "tokenizer.json")
            atomic_write_text(self.run_dir / "dataset.json", json.dumps(self.meta, indent=2))

    def _log(self, event: dict[str, Any]) -> None:
        if self.parallel.is_main:
            self.metrics.append(event)
            self.tracker.log(event)

    def _start(self, init_from: str | None, keep_optimizer: bool) -> None:
        checkpoints = self.run_dir / "checkpoints"
        if checkpoints.exists() and any(checkpoints.iterdir()):
            raise UserError(f"{self.run_dir} already has checkpoints; continue it with `lmlab train --resume "
                            f"{self.run_dir}` or pick a new --run.")
        if init_from:
            self._init_from(init_from, keep_optimizer)
        if not self.parallel.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.path.unlink(missing_ok=True)
        self.metrics.append({
            "event": "start", "step": 0, "lmlab_version": lmlab.__version__, "device": str(self.device),
            "world_size": self.parallel.world_size, "parallel": self.parallel.mode,
            "dtype": str(self.dtype).removeprefix("torch."), "params": self.model.num_params(),
            "params_non_embedding": self.model.num_params(embeddings=False),
            "dataset": self.cfg.data.dataset, "tokenizer": self.meta["tokenizer"], "init_from": init_from,
            "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops, "peak_source": self.peak_source,
        })

    def _init_from(self, source: str, keep_optimizer: bool) -> None:
        """Start from another run's weights (`runs/OLD`, `runs/OLD:best` or `runs/OLD:latest`)."""
        old_dir, _, which = source.partition(":")
        old = run_config(Path(old_dir)).model
        if old.vocab_size != self.cfg.model.vocab_size:
            raise UserError(f"--init-from {old_dir} has vocab size {old.vocab_size} but dataset "
                            f"{self.cfg.data.dataset} has {self.cfg.model.vocab_size}; use a dataset prepared "
                            "with the same tokenizer.")
        if dataclasses.asdict(old) != dataclasses.asdict(self.cfg.model):
            raise UserError(f"--init-from {old_dir} has another model shape "
                            f"({_differences(dataclasses.asdict(old), dataclasses.asdict(self.cfg.model))}); "
                            "use the same [model] settings as that run.")
        self.parallel.load_checkpoint(resolve(Path(old_dir), which or "latest"), self.model,
                                      self.optimizer if keep_optimizer else None)

    def _resume(self, force: bool) -> None:
        """Continue from `latest`; if it is damaged, fall back to the newest step folder that verifies."""
        if self.parallel.is_main:
            for leftover in (self.run_dir / "checkpoints").glob(".step_*.tmp-*"):  # a write cut short by a crash
                shutil.rmtree(leftover)
        resolve(self.run_dir, "latest")  # says so if there is nothing to resume
        trained, asked = dataclasses.asdict(run_config(self.run_dir).model), to_dict(self.cfg)["model"]
        trained["vocab_size"] = trained["vocab_size"] or asked["vocab_size"]  # 0 in a hand-written config
        if trained != asked:
            raise UserError(f"{self.run_dir} was trained with another model shape ({_differences(trained, asked)}); "
                            "resume with the run's own [model] settings.")
        folder, saved = self._load_newest_good()
        if saved["dataset_sha256"] != self.meta["train"]["sha256"] and not force:
            raise UserError(f"dataset {self.cfg.data.dataset} differs from the one {self.run_dir} was trained on "
                            "(train.bin checksum); pass --force to continue on the new data anyway.")
        self._restore(saved, data_position=True)
        if self.parallel.is_main:
            self.metrics.truncate_after(self.state.step)
        self.console.print(f"Resumed {self.run_dir} from {folder.name} (step {self.state.step}).")

    def _load_newest_good(self, at_most: int | None = None) -> tuple[Path, dict[str, Any]]:
        latest = resolve(self.run_dir, "latest")
        folders = sorted((p for p in (self.run_dir / "checkpoints").glob("step_*") if p.is_dir()), reverse=True)
        candidates = [latest] + [p for p in folders if p != latest]
        for folder in candidates:
            if at_most is not None and int(folder.name.removeprefix("step_")) > at_most:
                continue
            try:
                return folder, self.parallel.load_checkpoint(folder, self.model, self.optimizer)
            except UserError as err:
                self.console.print(f"[yellow]{err} Trying an older checkpoint.[/yellow]")
        raise UserError(f"no checkpoint of {self.run_dir} could be loaded; start the run again.")

    def _restore(self, saved: dict[str, Any], data_position: bool) -> None:
        self.state = RunState(**saved["progress"])
        self.guard = SpikeGuard(self.cfg.train.spike_zscore, self.cfg.train.spike_patience, **self.state.guard)
        if data_position:
            self.loader.restore(saved["loader"])
        torch.set_rng_state(_bytes_tensor(saved["torch_rng"]))
        if self.device.type == "cuda" and saved.get("cuda_rng"):
            torch.cuda.set_rng_state(_bytes_tensor(saved["cuda_rng"]))
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])

    def _checkpoint(self, best: bool) -> None:
        g = self.guard
        self.state.guard = {"loss": dataclasses.asdict(g.loss), "grad_norm": dataclasses.asdict(g.grad_norm),
                            "bad_in_row": g.bad_in_row, "seen": g.seen}
        state = {
            "progress": dataclasses.asdict(self.state),
            "loader": self.loader.state(),
            "torch_rng": _bytes_text(torch.get_rng_state()),
            "cuda_rng": _bytes_text(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "model_config": to_dict(self.cfg)["model"],
            "dataset_sha256": self.meta["train"]["sha256"],
            "lmlab_version": lmlab.__version__,
        }
        # Logged first: a crash between the two leaves an event that resume drops with everything after the
        # checkpoint it falls back to, while the other order could lose the event of a checkpoint that exists.
        self._log({"event": "checkpoint", "step": self.state.step, "best": best})
        weights, optimizer_state = self.parallel.full_state(self.model, self.optimizer)
        if self.parallel.is_main:
            save_checkpoint(self.run_dir, self.state.step, weights, optimizer_state, state, best)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.parallel.barrier()  # a rollback on any rank reads what rank 0 wrote
        self._saved_step = self.state.step

    def _train_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches, queued for the guard without a host sync."""
        tc = self.cfg.train
        lr = lr_at(self.state.step, tc) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.parallel.micro_batches(self.loader, tc.grad_accum_steps)
        total, norm = accumulate_gradients(self.forward, self.model, self.optimizer, self.scaler, batches,
                                           self.micro_steps, self.device, self.dtype, tc.grad_clip)
        total, norm = self.parallel.reduce_step(total, norm)
        if not self.scaler.is_enabled():  # (the fp16 scaler sets this itself)
            # A non-finite loss or gradient never reaches the weights: the fused AdamW kernel skips the whole
            # update, moments and step count included, when found_inf is 1, decided on the device (Muon: optim.py).
            self.optimizer.found_inf = (~(torch.isfinite(total) & torch.isfinite(norm))).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((self.state.step + 1, lr, total, norm))

    def _judge_pending(self) -> bool:
        """Read the queued steps' loss and grad norm (one host sync for all of them), let the guard judge
        them in order and keep the averages; False if the guard rolled the run back."""
        s, pending, self._pending = self.state, self._pending, []
        for step, lr, total, norm in pending:
            loss, grad_norm = total.item(), norm.item()
            verdict = self.guard.judge(loss, grad_norm)
            if verdict in ("skip", "spike"):
                self._log({"event": verdict, "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr})
            if verdict == "rollback":
                self._rollback(step)  # the steps queued after it belong to the discarded history
                return False
            if verdict != "skip":  # a non-finite loss would poison the averages
                s.loss_since_log, s.loss_since_eval = s.loss_since_log + loss, s.loss_since_eval + loss
                s.steps_since_log, s.steps_since_eval = s.steps_since_log + 1, s.steps_since_eval + 1
            self._grad_norm = grad_norm
        return True

    def _rollback(self, step: int) -> None:
        """`step` completed a streak of bad steps: reload the newest checkpoint from before the streak, keep
        the data position (so the bad batches are not replayed) and lower the LR."""
        guard, scale, elapsed = self.guard, self.state.lr_scale * self.cfg.train.rollback_lr_factor, self.state.elapsed
        try:
            folder, saved = self._load_newest_good(at_most=step - self.cfg.train.spike_patience)
        except UserError:  # no checkpoint from before the streak yet: all we can do is lower the LR
            folder = None
        if folder is not None:
            self._restore(saved, data_position=False)
        self.guard, self.state.lr_scale, self.state.elapsed = guard, scale, elapsed
        self._log({"event": "rollback", "step": step, "to_step": self.state.step, "lr_scale": scale})
        where = f"rolled back to {folder.name}" if folder else "no earlier checkpoint to roll back to"
        self.console.print(f"[yellow]step {step}: {self.cfg.train.spike_patience} bad steps in a row; {where}; "
                           f"LR scaled by {scale:g}[/yellow]")

    def _evaluate(self) -> tuple[float, float]:
        tc = self.cfg.train
        self.model.eval()
        # Fixed seeds: every eval scores the same batches, so curves move only because the model did.
        train, val = (estimate_loss(self.forward, tokens, self.cfg.model.block_size, tc.batch_size, tc.eval_iters,
                                    tc.seed + offset, self.device, self.dtype, self.parallel)
                      for offset, tokens in ((1, self.train_tokens), (2, self.val_tokens)))
        self.model.train()
        return train, val

    def _after_eval(self, train_eval: float, val: float) -> bool:
        """Log an eval (its train loss: the mean since the last eval) and return whether it is a new best."""
        s, tc = self.state, self.cfg.train
        is_best = val < s.best_val_loss
        if is_best:
            s.best_val_loss, s.best_step, s.evals_since_best = val, s.step, 0
        else:
            s.evals_since_best += 1
        avg_train = s.loss_since_eval / max(1, s.steps_since_eval)
        s.loss_since_eval, s.steps_since_eval = 0.0, 0
        self._log({"event": "eval", "step": s.step, "tokens": s.tokens, "elapsed": round(s.elapsed, 3),
                   "train_loss": avg_train, "train_eval_loss": train_eval, "val_loss": val,
                   "best_val_loss": s.best_val_loss, "is_best": is_best})
        if self.parallel.is_main:
            plot_losses(self.run_dir)  # kept current, so a long run can be watched while it goes
        mark = " | [bold green]best![/bold green]" if is_best else ""
        self.console.print(f"step {s.step} | train {avg_train:.4f} | val {val:.4f}{mark}")
        s.stopped_early = bool(tc.patience) and s.evals_since_best >= tc.patience
        return is_best

    def _log_train(self, rate: float) -> str:
        s = self.state
        mean = s.loss_since_log / max(1, s.steps_since_log)
        mfu = rate * self.flops_per_token / self.peak_flops
        self._log({"event": "train", "step": s.step, "tokens": s.tokens, "loss": mean,
                   "lr": lr_at(s.step - 1, self.cfg.train) * s.lr_scale, "grad_norm": self._grad_norm,
                   "tokens_per_sec": round(rate, 1), "mfu": round(mfu, 4), "elapsed": round(s.elapsed, 3)})
        s.loss_since_log, s.steps_since_log = 0.0, 0
        return f"loss {mean:.4f} | {rate:,.0f} tok/s | MFU {100 * mfu:.1f}%"

    def run(self) -> TrainResult:
        """Train to max_iters (or early stop, max_seconds, a stop signal); `train.pid` marks the run as running."""
        pid_file = self.run_dir / "train.pid"
        if self.parallel.is_main:
            pid_file.write_text(str(os.getpid()))
        try:
            return self._loop()
        finally:
            self.tracker.close()
            if self.parallel.is_main:
                pid_file.unlink(missing_ok=True)
            self.parallel.close()

    def _loop(self) -> TrainResult:
        s, tc = self.state, self.cfg.train
        self.model.train()
        tokens_per_step = tc.batch_size * tc.grad_accum_steps * self.cfg.model.block_size
        clock, elapsed_before = time.perf_counter(), s.elapsed
        step_seconds, timed_steps = 0.0, 0  # time in training steps (not evals) since the last log line
        out_of_time = False  # train.max_seconds reached: the step that crosses it ends with an eval
        columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                   TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar, _StopOnSignal() as stop:
            task = bar.add_task("train", total=tc.max_iters, completed=s.step, info="")
            while (s.step < tc.max_iters and not s.stopped_early and not out_of_time
                   and not self.parallel.any(bool(stop.signal))):
                started = time.perf_counter()
                self._train_step()
                s.step, s.tokens = s.step + 1, s.tokens + tokens_per_step
                logging = s.step % tc.log_interval == 0
                # Agreed by all ranks, as the eval it triggers is collective; the same config on every rank.
                out_of_time = bool(tc.max_seconds) and self.parallel.any(
                    elapsed_before + time.perf_counter() - clock >= tc.max_seconds)
                evaluating = s.step % tc.eval_interval == 0 or s.step == tc.max_iters or out_of_time
                saving = s.step % tc.checkpoint_interval == 0
                # The device runs ahead (and the next batch is prepared meanwhile) until a point that needs
                # the losses: a log line, an eval, a checkpoint.
                if (logging or evaluating or saving) and not self._judge_pending():
                    s = self.state
                    continue
                step_seconds, timed_steps = step_seconds + time.perf_counter() - started, timed_steps + 1
                s.elapsed = elapsed_before + time.perf_counter() - clock
                if logging:
                    bar.update(task, info=self._log_train(tokens_per_step * timed_steps / step_seconds))
                    step_seconds, timed_steps = 0.0, 0
                best = False
                if evaluating:
                    train_eval, val = self._evaluate()
                    s.elapsed = elapsed_before + time.perf_counter() - clock
                    best = self._after_eval(train_eval, val)
                if best or saving:
                    self._checkpoint(best)
                bar.update(task, completed=s.step)
            # The end, an early stop or a signal (whenever in the step it came): the last step is always saved.
            self._judge_pending()
            s = self.state
            if self._saved_step != s.step:
                self._checkpoint(best=False)
        return self._finish(stop.signal)

    def _finish(self, stopped_by: str | None) -> TrainResult:
        s = self.state
        self._log({"event": "end", "step": s.step, "tokens": s.tokens, "elapsed": round(s.elapsed, 3),
                   "best_val_loss": s.best_val_loss, "best_step": s.best_step,
                   "stopped_early": s.stopped_early, "stopped_by": stopped_by})
        plot = plot_losses(self.run_dir) if self.parallel.is_main else self.run_dir / "loss.png"
        return TrainResult(self.run_dir, s.best_val_loss, s.best_step, s.step, s.stopped_early, plot, stopped_by)


class _StopOnSignal:
    """SIGINT/SIGTERM end the run after the current step (which is then checkpointed); a second one aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
