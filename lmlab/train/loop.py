"""The training loop: AdamW + warmup/cosine, grad accumulation and clipping, periodic eval, early stopping,
best/latest checkpoints, metrics.jsonl and a live progress bar."""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import lmlab
from lmlab.config import RunConfig, to_toml
from lmlab.data.loader import BatchLoader, open_tokens
from lmlab.data.prepare import read_meta
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.errors import UserError
from lmlab.evaluate import estimate_loss
from lmlab.fileio import atomic_write_text
from lmlab.model.gpt import GPT
from lmlab.plots import plot_losses
from lmlab.runs import MetricsLog
from lmlab.train.checkpoint import load_checkpoint, prune_checkpoints, resolve, save_checkpoint
from lmlab.train.optim import lr_at, make_optimizer


@dataclass
class RunState:
    """Everything besides weights and optimizer that a checkpoint must hold to continue exactly."""

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


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    loss_plot: Path


def resolve_config(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Fill model.vocab_size from the dataset and check that a given one matches it."""
    meta = read_meta(Path(cfg.data.dataset))
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but dataset {cfg.data.dataset} has {meta['vocab_size']} "
            "tokens; point data.dataset at the dataset this run was trained on."
        )
    return cfg, meta


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, device: str = "auto", resume: bool = False,
                 console: Console | None = None):
        self.cfg, self.meta = resolve_config(cfg)
        self.run_dir = Path(run_dir)
        self.console = console or Console()
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, cfg.train.dtype)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        tc, mc = self.cfg.train, self.cfg.model
        self.model = GPT(mc).to(self.device)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.optimizer = make_optimizer(self.model, tc, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.train_tokens = open_tokens(Path(cfg.data.dataset), "train", self.meta["dtype"])
        self.val_tokens = open_tokens(Path(cfg.data.dataset), "val", self.meta["dtype"])
        self.loader = BatchLoader(self.train_tokens, mc.block_size, tc.batch_size, tc.seed, "train")
        BatchLoader(self.val_tokens, mc.block_size, tc.batch_size, tc.seed, "val")  # checks the split is long enough
        self.metrics = MetricsLog(self.run_dir)
        self.state = RunState()
        self._open_run(resume)

    def _open_run(self, resume: bool) -> None:
        checkpoints = self.run_dir / "checkpoints"
        if resume:
            self._resume()
        elif checkpoints.exists() and any(checkpoints.iterdir()):
            raise UserError(f"{self.run_dir} already has checkpoints; continue it with `lmlab train --resume "
                            f"{self.run_dir}` or pick a new --run.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        if not resume:
            self.metrics.path.unlink(missing_ok=True)
            self.metrics.append({
                "event": "start", "step": 0, "lmlab_version": lmlab.__version__, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "params": self.model.num_params(),
                "params_non_embedding": self.model.num_params(embeddings=False),
                "dataset": self.cfg.data.dataset, "tokenizer": self.meta["tokenizer"],
            })

    def _resume(self) -> None:
        """Continue from `latest`; if it is damaged, fall back to the newest step folder that verifies."""
        latest = resolve(self.run_dir, "latest")
        candidates = [latest] + sorted((p for p in (self.run_dir / "checkpoints").glob("step_*")
                                        if p.is_dir() and p != latest), reverse=True)
        for folder in candidates:
            try:
                saved = load_checkpoint(folder, self.model, self.optimizer)
                break
            except UserError as err:
                self.console.print(f"[yellow]{err} Trying an older checkpoint.[/yellow]")
        else:
            raise UserError(f"no checkpoint of {self.run_dir} could be loaded; start the run again.")
        known = {f.name for f in dataclasses.fields(RunState)}
        self.state = RunState(**{k: v for k, v in saved["progress"].items() if k in known})
        self.loader.restore(saved["loader"])
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(saved["torch_rng"])), dtype=torch.uint8))
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.metrics.truncate_after(self.state.step)
        self.console.print(f"Resumed {self.run_dir} from {folder.name} (step {self.state.step}).")

    def _checkpoint(self, best: bool) -> None:
        tc = self.cfg.train
        state = {
            "progress": dataclasses.asdict(self.state),
            "loader": self.loader.state(),
            "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "lmlab_version": lmlab.__version__,
        }
        folder = save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, state, best)
        prune_checkpoints(self.run_dir, tc.keep_checkpoints)
        self.metrics.append({"event": "checkpoint", "step": self.state.step, "path": str(folder), "best": best})

    def _train_step(self) -> torch.Tensor:
        tc = self.cfg.train
        lr = lr_at(self.state.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(tc.grad_accum_steps):
            x, y = self.loader.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            loss = loss / tc.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if tc.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _evaluate(self) -> tuple[float, float]:
        tc = self.cfg.train
        self.model.eval()
        # Fixed seeds: every eval scores the same batches, so curves move only because the model did.
        train = estimate_loss(self.forward, self.train_tokens, tc.batch_size, tc.eval_iters, tc.seed + 1,
                              self.device, self.dtype)
        val = estimate_loss(self.forward, self.val_tokens, tc.batch_size, tc.eval_iters, tc.seed + 2,
                            self.device, self.dtype)
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
        self.metrics.append({"event": "eval", "step": s.step, "tokens": s.tokens, "elapsed": round(s.elapsed, 3),
                             "train_loss": avg_train, "train_eval_loss": train_eval, "val_loss": val,
                             "best_val_loss": s.best_val_loss, "is_best": is_best})
        mark = " | [bold green]best![/bold green]" if is_best else ""
        self.console.print(f"step {s.step} | train {avg_train:.4f} | val {val:.4f}{mark}")
        s.stopped_early = bool(tc.patience) and s.evals_since_best >= tc.patience
        return is_best

    def run(self) -> TrainResult:
        s, tc = self.state, self.cfg.train
        self.model.train()
        tokens_per_step = tc.batch_size * tc.grad_accum_steps * self.cfg.model.block_size
        clock, elapsed_before = time.perf_counter(), s.elapsed
        # Loss sums stay on the device between log intervals: reading them every step would stall a GPU.
        since_log = torch.tensor(s.loss_since_log, device=self.device)
        since_eval = torch.tensor(s.loss_since_eval, device=self.device)
        step_seconds = 0.0
        columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                   TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("train", total=tc.max_iters, completed=s.step, info="")
            while s.step < tc.max_iters and not s.stopped_early:
                started = time.perf_counter()
                loss = self._train_step()
                since_log += loss
                since_eval += loss
                s.step, s.tokens = s.step + 1, s.tokens + tokens_per_step
                s.steps_since_log, s.steps_since_eval = s.steps_since_log + 1, s.steps_since_eval + 1
                logging = s.step % tc.log_interval == 0
                mean = since_log.item() / s.steps_since_log if logging else 0.0  # .item() syncs, so the clock is honest
                step_seconds += time.perf_counter() - started
                s.elapsed = elapsed_before + time.perf_counter() - clock
                if logging:
                    rate = tokens_per_step * s.steps_since_log / step_seconds
                    self.metrics.append({"event": "train", "step": s.step, "tokens": s.tokens, "loss": mean,
                                         "lr": lr_at(s.step - 1, tc), "tokens_per_sec": round(rate, 1),
                                         "elapsed": round(s.elapsed, 3)})
                    bar.update(task, info=f"loss {mean:.4f} | {rate:,.0f} tok/s")
                    since_log.zero_()
                    s.steps_since_log, step_seconds = 0, 0.0
                best = False
                if s.step % tc.eval_interval == 0 or s.step == tc.max_iters:
                    s.loss_since_eval = since_eval.item()
                    since_eval.zero_()
                    train_eval, val = self._evaluate()
                    s.elapsed = elapsed_before + time.perf_counter() - clock
                    best = self._after_eval(train_eval, val)
                if best or s.step == tc.max_iters or s.stopped_early or s.step % tc.checkpoint_interval == 0:
                    s.loss_since_log, s.loss_since_eval = since_log.item(), since_eval.item()
                    self._checkpoint(best)
                bar.update(task, completed=s.step)
        return self._finish()

    def _finish(self) -> TrainResult:
        s = self.state
        self.metrics.append({"event": "end", "step": s.step, "tokens": s.tokens, "elapsed": round(s.elapsed, 3),
                             "best_val_loss": s.best_val_loss, "best_step": s.best_step,
                             "stopped_early": s.stopped_early})
        plot = plot_losses(self.run_dir)
        return TrainResult(self.run_dir, s.best_val_loss, s.best_step, s.step, s.stopped_early, plot)
