"""Instruction fine-tuning on Alpaca-format records: the loss on the response and its end marker only, a held-out split
scored each epoch (the best epoch is `best`), the prompt format kept in RUN/prompt.json. The same command again
continues an unfinished fine-tune from its newest checkpoint to the weights an uninterrupted one reaches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.analysis.plots import plot_losses
from lmlab.core.config import FinetuneConfig, RunConfig
from lmlab.core.device import autocast, resolve_device
from lmlab.core.errors import UserError
from lmlab.core.fileio import sha256_file
from lmlab.core.progress import progress_bar
from lmlab.core.threads import Choice, ThreadChooser
from lmlab.data.tokenizers import Tokenizer
from lmlab.model.loss import IGNORE
from lmlab.model.memory import check_training
from lmlab.run.checkpoint import model_tensors
from lmlab.run.prompt import PromptFormat, alpaca_format, check_format, read_records
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.train.machine import Machine
from lmlab.train.optim import optimizer_of
from lmlab.train.schedule import lr_at
from lmlab.train.state import Stopwatch, rng_state, set_rng_state
from lmlab.train.step import TrainStep
from lmlab.train.stop import StepAbandoned, StopOnSignal, begun


def split_records(records: list[dict[str, str]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out records chosen by a hash of their content: the same file always splits the same way."""
    if len(records) < 2:
        raise UserError(f"a held-out split needs at least 2 records; the file has {len(records)}.")
    order = sorted(range(len(records)),
                   key=lambda i: hashlib.sha256(json.dumps(records[i], sort_keys=True).encode()).hexdigest())
    val = set(order[:max(1, round(val_fraction * len(records)))])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def encode_example(tokenizer: Tokenizer, fmt: PromptFormat, record: dict[str, str]) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + response + end marker, and which of them the loss is taken on (response and end)."""
    prompt = tokenizer.encode(fmt.render(record["instruction"], record.get("input", "")))
    answer = tokenizer.encode(record["output"] + fmt.end)
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def _batch(examples: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) padded to the longest example; targets of prompt and padding are IGNORE."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, (ids, scored) in enumerate(examples):
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        y[row, :n] = torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], scored[1:])])
    return x, y


@dataclass
class FinetuneResult:
    run_dir: Path
    base_val_loss: float  # of the base model, before any update
    val_losses: list[float]  # one per finished epoch
    best_epoch: int
    dropped: int  # records longer than the context, left out
    loss_plot: Path
    stopped_by: str | None = None  # the signal that stopped it before its last epoch ended
    abandoned: bool = False  # the signal came during a step that did not end within the grace period
    saved: Path | None = None  # the newest step folder, what the same command continues from


Examples = list[tuple[list[int], list[bool]]]


@dataclass
class Position:
    """Where a fine-tune stands, all of it in each checkpoint: epochs finished, batches done in the next one and
    their losses, each finished epoch's val loss, the base model's."""

    epoch: int = 0
    batch: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[float] = dataclasses.field(default_factory=list)
    base_val_loss: float = math.nan


class _Finetuner:
    """The state one fine-tuning run shares between its steps, evaluations and checkpoints."""

    def __init__(self, base: LoadedRun, cfg: RunConfig, run: RunDir, console: Console, threads: ThreadChooser):
        self.model, self.cfg, self.run, self.console, self.threads = base.model.train(), cfg, run, console, threads
        self.device, self.dtype = base.device, base.dtype
        self.train_step = TrainStep(self.model, cfg.train, self.device, self.dtype,
                                    attention_setting="finetune.attention")
        if self.train_step.note:
            console.print(f"[yellow]{self.train_step.note}[/yellow]")
        self.step, self.tokens, self.clock = 0, 0, Stopwatch()
        self.at = Position()
        self.stop = StopOnSignal()
        self.saved_step = -1

    def loss(self, examples: Examples) -> tuple[torch.Tensor, int]:
        x, y = (t.to(self.device) for t in _batch(examples))
        with autocast(self.device, self.dtype):
            _, loss = self.model(x, y)
        return loss, int((y != IGNORE).sum())

    @torch.no_grad()
    def val_loss(self, examples: Examples) -> float:
        """Mean loss per scored token over the held-out examples."""
        self.model.eval()
        total, count = 0.0, 0
        with self.stop.interruptible():
            for first in range(0, len(examples), self.cfg.train.batch_size):
                loss, n = self.loss(examples[first:first + self.cfg.train.batch_size])
                total, count = total + loss.item() * n, count + n
        self.model.train()
        return total / count

    def take_step(self, examples: Examples) -> float | None:
        """One optimizer step on a batch of records; its loss, or None if it was not finite (and so skipped)."""
        lr = lr_at(self.step, self.cfg.train)
        x, y = _batch(examples)
        started = time.perf_counter()
        with self.stop.interruptible():
            loss, norm = (t.item() for t in self.train_step([(x, y)], 1, lr))
        self.step, self.tokens = self.step + 1, self.tokens + int((y != IGNORE).sum())
        if changed := self.threads.stepped(time.perf_counter() - started):
            self.threads_changed(changed)
        self.at.batch += 1
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.run.log({"event": "skip", "step": self.step, "loss": loss, "grad_norm": norm, "lr": lr})
            return None
        self.at.losses.append(loss)
        self.run.log({"event": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                      "grad_norm": norm, "elapsed": round(self.clock.elapsed, 3)})
        return loss

    def threads_changed(self, choice: Choice) -> None:
        self.run.log(choice.record(self.step))
        self.console.print(f"step {self.step}: fine-tuning on {choice.describe('finetune.threads')}", highlight=False,
                           style="yellow" if choice.lowered else "default")

    def checkpoint(self, best: bool) -> None:
        self.run.log({"event": "checkpoint", "step": self.step, "best": best})
        training = {"epoch": self.at.epoch, "val_loss": self.at.val_losses[-1] if self.at.val_losses else None,
                    "position": dataclasses.asdict(self.at), "step": self.step, "tokens": self.tokens,
                    "clock": self.clock.state_dict(), "rng": rng_state(self.device),
                    "attention": self.train_step.attention_path}
        self.run.save_checkpoint(self.step, model_tensors(self.model), self.train_step.optimizer.state_dict(),
                                 training, best, self.cfg.train.keep_checkpoints)
        self.saved_step = self.step

    def restore(self, folder: Path) -> None:
        training = self.run.read_checkpoint(folder, self.model, self.train_step.optimizer)["training"]
        if not isinstance(training, dict) or "position" not in training:
            raise UserError(f"{folder} was written by a version of lmlab whose fine-tunes do not resume; fine-tune "
                            f"into a new --run.")
        self.at = Position(**training["position"])
        self.step, self.tokens, self.saved_step = training["step"], training["tokens"], training["step"]
        self.clock.load_state_dict(training["clock"])
        set_rng_state(training["rng"], self.device)
        self.train_step.restore_attention(training.get("attention"))
        self.run.truncate_after(self.step)
        self.run.resumed(self.step, folder.name, self.device, self.dtype, 1)

    def end_epoch(self, val: float) -> None:
        at = self.at
        best, train = min(at.val_losses, default=math.inf), sum(at.losses) / max(1, len(at.losses))
        at.epoch, at.batch, at.losses = at.epoch + 1, 0, []
        at.val_losses.append(val)
        self.run.log({"event": "eval", "step": self.step, "epoch": at.epoch, "tokens": self.tokens,
                      "elapsed": round(self.clock.elapsed, 3), "train_loss": train, "val_loss": val,
                      "best_val_loss": min(val, best), "is_best": val < best})
        self.checkpoint(val < best)
        plot_losses(self.run)
        mark = " | [bold green]best![/bold green]" if val < best else ""
        self.console.print(f"epoch {at.epoch} | train {train:.4f} | val {val:.4f}{mark}")


def _fitting(tokenizer: Tokenizer, fmt: PromptFormat, ft: FinetuneConfig, block_size: int) -> tuple[dict, int]:
    """The encoded train and held-out records that fit the context, and how many did not."""
    records = read_records(Path(ft.data))
    for i, record in enumerate(records):  # a char tokenizer cannot write every text: name the record
        for key in ("instruction", "input", "output"):
            tokenizer.check(record.get(key, ""), f"{ft.data}: record {i}'s `{key}`")
    train_records, val_records = split_records(records, ft.val_fraction)
    encoded = {name: [encode_example(tokenizer, fmt, r) for r in records]
               for name, records in (("train", train_records), ("val", val_records))}
    # Learned positions end at block_size: a longer example cannot be trained on whole, so it is left out.
    fits = {name: [e for e in examples if len(e[0]) <= block_size + 1] for name, examples in encoded.items()}
    if not fits["train"] or not fits["val"]:
        raise UserError(f"no {'training' if not fits['train'] else 'held-out'} record of {ft.data} fits the model's "
                        f"context of {block_size} tokens; use shorter records.")
    return fits, sum(len(encoded[n]) - len(fits[n]) for n in encoded)


def finetune(base_dir: Path, run_dir: Path, ft: FinetuneConfig, device: str = "auto",
             console: Console | None = None) -> FinetuneResult:
    """Fine-tune the `best` model of run `base_dir` on the Alpaca records `ft.data` into the new run `run_dir`, or
    continue an unfinished fine-tune there made by the same command."""
    if not ft.data:
        raise UserError("fine-tuning needs records: pass --data FILE.json or set finetune.data.")
    # Chosen before the set-up, whose load tells a quiet machine; a step's last bits depend on the count, which
    # finetune.threads fixes.
    before = torch.get_num_threads()  # given back at the end: a caller's process keeps its own threads
    threads = ThreadChooser(ft.threads, "finetune.threads")
    try:
        # A stop during the set-up ends it at once, nothing written; after `begun`, after the first step.
        with StopOnSignal(setting_up=True), RunDir(run_dir).locked() as run:  # one writer: a second one is refused
            return _finetune(base_dir, run, ft, device, console or Console(), threads)
    finally:
        torch.set_num_threads(before)


def _origin(base: LoadedRun, base_dir: Path, ft: FinetuneConfig, fits: dict, dropped: int,
            fmt: PromptFormat) -> dict[str, Any]:
    """What a fine-tune came from, in its start event: the same command again must find the same."""
    return {"data": ft.data, "data_sha256": sha256_file(Path(ft.data)), "train_records": len(fits["train"]),
            "val_records": len(fits["val"]), "dropped_records": dropped, "epochs": ft.epochs,
            "prompt_format": fmt.name, "base": str(Path(base_dir).resolve()), "base_checkpoint": base.checkpoint,
            "base_weights_sha256": base.weights_sha256}


def _continuing(run: RunDir, ft: FinetuneConfig, origin: dict[str, Any]) -> bool:
    """Whether `run` holds an unfinished fine-tune made by this command (continue it), or nothing yet (start it);
    anything else there is refused."""
    if not run.step_folders():
        return False
    if run.kind() != "fine-tuned" or not run.unfinished():
        run.check_new()  # says what the run is and where to go instead
    theirs = run.events(limit=1)[0].get("origin") or {}
    if "base" not in theirs:
        raise UserError(f"{run.path} holds an unfinished fine-tune written by an earlier version of lmlab, whose "
                        "fine-tunes cannot be continued; choose a new --run.")
    # What may differ: the threads, and the attention path a continued fine-tune takes from its checkpoint.
    old = dataclasses.replace(run.config().finetune, checkpoint_interval=ft.checkpoint_interval, threads=ft.threads,
                              attention=ft.attention)
    changed = [f"finetune.{f.name} {getattr(old, f.name)} -> {getattr(ft, f.name)}" for f in dataclasses.fields(ft)
               if getattr(old, f.name) != getattr(ft, f.name)]
    changed += [f"the {what} changed since" for key, what in (("base", "base run"), ("data_sha256", "records"),
                                                               ("base_weights_sha256", "base run's weights"))
                if theirs.get(key) != origin[key]]
    if changed:
        raise UserError(f"{run.path} holds an unfinished fine-tune made by another command ({'; '.join(changed)}); "
                        f"finish it with `{run.resume_command()}`, or choose a new --run.")
    return True


def _finetune(base_dir: Path, run: RunDir, ft: FinetuneConfig, device: str, console: Console,
              threads: ThreadChooser) -> FinetuneResult:
    torch.manual_seed(ft.seed)
    base_run = RunDir(base_dir)
    base_cfg = base_run.config()
    check_training(base_cfg.model, ft.batch_size, optimizer_of(base_cfg.train).state_bytes, resolve_device(device),
                   setting="finetune.batch_size")
    base = base_run.load("best", device)
    fmt = alpaca_format(base.tokenizer)
    check_format(base.tokenizer, fmt, base_run.path)
    fits, dropped = _fitting(base.tokenizer, fmt, ft, base.config.model.block_size)
    steps_per_epoch = math.ceil(len(fits["train"]) / ft.batch_size)
    total = ft.epochs * steps_per_epoch
    # A warmup of 5% of the steps, then a cosine to a tenth of the peak over the whole fine-tune. Uncompiled: the
    # padded batches change length from step to step.
    train_cfg = dataclasses.replace(base.config.train, learning_rate=ft.learning_rate, min_lr=ft.learning_rate / 10,
                                    warmup_iters=total // 20, max_iters=total, lr_decay_iters=0,
                                    batch_size=ft.batch_size, seed=ft.seed, compile=False, attention=ft.attention)
    cfg = dataclasses.replace(base.config, train=train_cfg, finetune=ft)
    origin = _origin(base, base_dir, ft, fits, dropped, fmt)
    continuing = _continuing(run, ft, origin)
    longest = max(len(ids) for ids, _ in fits["train"]) - 1  # the start event records the threads chosen
    choice = Machine(base.device, base.dtype).threads(threads, base.model, ft.batch_size, longest)
    begun()
    if not continuing:
        if base.checkpoint != "best":
            console.print(f"note: {base_dir} has no best checkpoint (it was never evaluated); fine-tuning its latest "
                          f"(step {base.step})")
        dataset = base.run.dataset()
        run.begin("fine-tuned", base.model, cfg, dataset, init_from=str(base_dir), device=base.device,
                  dtype=base.dtype, origin=origin)
        run.write_setup(cfg, base.run.path / "tokenizer.json", dataset, fmt)
    else:
        run.write_config(cfg)  # its checkpoint_interval, threads or attention may differ
    tuner = _Finetuner(base, cfg, run, console, threads)
    if continuing:
        run.remove_partial_checkpoints()
        folder = run.checkpoint("latest")
        tuner.restore(folder)
        console.print(f"Resumed {run.path} from {folder.name} (step {tuner.step}, epoch {tuner.at.epoch + 1} of "
                      f"{ft.epochs}).")
    if attention := tuner.train_step.attention:
        console.print(attention.line(), highlight=False)
        if not continuing:
            run.log(attention.record(0))
    if choice.lowered:
        tuner.threads_changed(choice)
    if not continuing:
        tuner.at.base_val_loss = tuner.val_loss(fits["val"])
        console.print(f"base model val loss on the held-out records: {tuner.at.base_val_loss:.4f}")
    try:
        stopped_by = _epochs(tuner, fits["train"], fits["val"], ft, steps_per_epoch)
    except StepAbandoned as abandoned:
        return _ended(tuner, dropped, abandoned.signal, abandoned=True)
    return _ended(tuner, dropped, stopped_by)


def _ended(tuner: _Finetuner, dropped: int, stopped_by: str | None, abandoned: bool = False) -> FinetuneResult:
    """Log the end (of the whole fine-tune, or where a stop signal ended it) and say how it went."""
    at, run = tuner.at, tuner.run
    best_epoch = 1 + at.val_losses.index(min(at.val_losses)) if at.val_losses else 0
    run.log({"event": "end", "step": tuner.step, "tokens": tuner.tokens, "elapsed": round(tuner.clock.elapsed, 3),
             "best_val_loss": min(at.val_losses, default=None), "best_epoch": best_epoch,
             "base_val_loss": at.base_val_loss, "stopped_early": False, "stopped_by": stopped_by})
    saved = run.step_folders()
    return FinetuneResult(run.path, at.base_val_loss, at.val_losses, best_epoch, dropped, plot_losses(run),
                          stopped_by, abandoned, saved[-1] if saved else None)


def _epochs(tuner: _Finetuner, train: Examples, val: Examples, ft: FinetuneConfig, steps_per_epoch: int) -> str | None:
    """Train epoch by epoch (shuffled each time) from where the tuner stands, under a progress bar; the signal that
    stopped it, or None once every epoch is done."""
    size, at = ft.batch_size, tuner.at
    rng = random.Random(ft.seed)
    tuner.clock.start()
    with progress_bar(tuner.console, plain_every=tuner.cfg.train.log_interval) as bar, tuner.stop as stop:
        task = bar.add_task("finetune", total=ft.epochs * steps_per_epoch, completed=tuner.step, info="")
        for epoch in range(1, ft.epochs + 1):
            order = train[:]
            rng.shuffle(order)  # every epoch's order drawn again, so a resumed one is the same
            if epoch <= at.epoch:
                continue
            for first in range(at.batch * size, len(order), size):
                loss = tuner.take_step(order[first:first + size])
                bar.update(task, completed=tuner.step, info=f"epoch {epoch}/{ft.epochs} | loss "
                           f"{math.nan if loss is None else loss:.4f}")
                if stop.signal:
                    tuner.checkpoint(best=False)
                    return stop.signal
                if tuner.step % ft.checkpoint_interval == 0 and first + size < len(order):
                    tuner.checkpoint(best=False)
            tuner.end_epoch(tuner.val_loss(val))
            if stop.signal:
                return stop.signal
    return None
