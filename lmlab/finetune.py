"""Instruction fine-tuning on Alpaca-format records (`instruction`, optional `input`, `output`).

Each record becomes the Alpaca prompt followed by the response and an end marker; the loss is taken on the
response and the end marker only (the prompt's labels are ignore_index). A deterministic held-out split is
scored after every epoch and the best epoch is the run's `best` checkpoint. The prompt format is saved in
RUN/prompt.json, so `sample --instruction`, `answer` and `serve` ask the model the way it was taught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from lmlab.checkpoint import model_tensors
from lmlab.config import FinetuneConfig, RunConfig
from lmlab.data.tokenizers import Tokenizer
from lmlab.device import autocast
from lmlab.errors import UserError
from lmlab.fileio import sha256_file
from lmlab.model.loss import IGNORE
from lmlab.plots import plot_losses
from lmlab.progress import progress_bar
from lmlab.prompt import PromptFormat, alpaca_format, read_records
from lmlab.rundir import LoadedRun, RunDir
from lmlab.train.optim import lr_at
from lmlab.train.state import Stopwatch
from lmlab.train.step import TrainStep


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
    val_losses: list[float]  # one per epoch
    best_epoch: int
    dropped: int  # records longer than the context, left out
    loss_plot: Path


Examples = list[tuple[list[int], list[bool]]]


class _Finetuner:
    """The state one fine-tuning run shares between its steps, evaluations and checkpoints."""

    def __init__(self, base: LoadedRun, cfg: RunConfig, run: RunDir, console: Console):
        self.model, self.cfg, self.run, self.console = base.model.train(), cfg, run, console
        self.device, self.dtype = base.device, base.dtype
        self.train_step = TrainStep(self.model, cfg.train, self.device, self.dtype)
        if self.train_step.note:
            console.print(f"[yellow]{self.train_step.note}[/yellow]")
        self.step, self.tokens, self.clock = 0, 0, Stopwatch()
        self.clock.start()

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
        for first in range(0, len(examples), self.cfg.train.batch_size):
            loss, n = self.loss(examples[first:first + self.cfg.train.batch_size])
            total, count = total + loss.item() * n, count + n
        self.model.train()
        return total / count

    def take_step(self, examples: Examples) -> float | None:
        """One optimizer step on a batch of records; its loss, or None if it was not finite (and so skipped)."""
        lr = lr_at(self.step, self.cfg.train)
        x, y = _batch(examples)
        loss, norm = (t.item() for t in self.train_step([(x, y)], 1, lr))
        self.step, self.tokens = self.step + 1, self.tokens + int((y != IGNORE).sum())
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.run.log({"event": "skip", "step": self.step, "loss": loss, "grad_norm": norm, "lr": lr})
            return None
        self.run.log({"event": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                      "grad_norm": norm, "elapsed": round(self.clock.elapsed, 3)})
        return loss

    def end_epoch(self, epoch: int, train_losses: list[float], val: float, best: float) -> None:
        is_best, train = val < best, sum(train_losses) / max(1, len(train_losses))
        self.run.log({"event": "eval", "step": self.step, "epoch": epoch, "tokens": self.tokens,
                      "elapsed": round(self.clock.elapsed, 3), "train_loss": train, "val_loss": val,
                      "best_val_loss": min(val, best), "is_best": is_best})
        self.run.log({"event": "checkpoint", "step": self.step, "best": is_best})
        self.run.save_checkpoint(self.step, model_tensors(self.model), self.train_step.optimizer.state_dict(),
                                 {"epoch": epoch, "val_loss": val}, is_best, self.cfg.train.keep_checkpoints)
        plot_losses(self.run)
        mark = " | [bold green]best![/bold green]" if is_best else ""
        self.console.print(f"epoch {epoch} | train {train:.4f} | val {val:.4f}{mark}")


def _fitting(tokenizer: Tokenizer, fmt: PromptFormat, ft: FinetuneConfig, block_size: int) -> tuple[dict, int]:
    """The encoded train and held-out records that fit the context, and how many did not."""
    train_records, val_records = split_records(read_records(Path(ft.data)), ft.val_fraction)
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
    """Fine-tune the `best` model of run `base_dir` on the Alpaca records `ft.data` into the new run `run_dir`."""
    if not ft.data:
        raise UserError("fine-tuning needs records: pass --data FILE.json or set finetune.data.")
    with RunDir(run_dir).locked() as run:  # one writer: a second fine-tune into the same --run is refused
        return _finetune(base_dir, run, ft, device, console or Console())


def _finetune(base_dir: Path, run: RunDir, ft: FinetuneConfig, device: str, console: Console) -> FinetuneResult:
    torch.manual_seed(ft.seed)
    run.check_new()
    base = RunDir(base_dir).load("best", device)
    if base.checkpoint != "best":
        console.print(f"note: {base_dir} has no best checkpoint (it was never evaluated); fine-tuning its latest "
                      f"(step {base.step})")
    fmt = alpaca_format(base.tokenizer)
    fits, dropped = _fitting(base.tokenizer, fmt, ft, base.config.model.block_size)
    steps_per_epoch = math.ceil(len(fits["train"]) / ft.batch_size)
    total = ft.epochs * steps_per_epoch
    # A warmup of 5% of the steps, then a cosine to a tenth of the peak over the whole fine-tune. Uncompiled: the
    # padded batches change length from step to step.
    train_cfg = dataclasses.replace(base.config.train, learning_rate=ft.learning_rate, min_lr=ft.learning_rate / 10,
                                    warmup_iters=total // 20, max_iters=total, lr_decay_iters=0,
                                    batch_size=ft.batch_size, seed=ft.seed, compile=False)
    cfg = dataclasses.replace(base.config, train=train_cfg, finetune=ft)
    facts = {"data": ft.data, "data_sha256": sha256_file(Path(ft.data)), "train_records": len(fits["train"]),
             "val_records": len(fits["val"]), "dropped_records": dropped, "epochs": ft.epochs,
             "prompt_format": fmt.name}
    dataset = base.run.dataset()
    run.begin("fine-tuned", base.model, cfg, dataset, init_from=str(base_dir), device=base.device, dtype=base.dtype,
              origin=facts)
    run.write_setup(cfg, base.run.path / "tokenizer.json", dataset, fmt)
    tuner = _Finetuner(base, cfg, run, console)
    base_val = tuner.val_loss(fits["val"])
    console.print(f"base model val loss on the held-out records: {base_val:.4f}")
    val_losses = _epochs(tuner, fits["train"], fits["val"], ft.epochs, steps_per_epoch, random.Random(ft.seed))
    best_epoch = 1 + val_losses.index(min(val_losses))
    run.log({"event": "end", "step": tuner.step, "tokens": tuner.tokens, "elapsed": round(tuner.clock.elapsed, 3),
             "best_val_loss": min(val_losses), "best_epoch": best_epoch, "base_val_loss": base_val,
             "stopped_early": False, "stopped_by": None})
    return FinetuneResult(run.path, base_val, val_losses, best_epoch, dropped, plot_losses(run))


def _epochs(tuner: _Finetuner, train: Examples, val: Examples, epochs: int, steps_per_epoch: int,
            rng: random.Random) -> list[float]:
    """Train epoch by epoch (shuffled each time) under a progress bar; returns each epoch's val loss."""
    size = tuner.cfg.train.batch_size
    val_losses: list[float] = []
    with progress_bar(tuner.console, plain_every=tuner.cfg.train.log_interval) as bar:
        task = bar.add_task("finetune", total=epochs * steps_per_epoch, info="")
        for epoch in range(1, epochs + 1):
            order = train[:]
            rng.shuffle(order)
            losses = []
            for first in range(0, len(order), size):
                loss = tuner.take_step(order[first:first + size])
                losses += [] if loss is None else [loss]
                bar.update(task, advance=1, info=f"epoch {epoch}/{epochs} | loss {math.nan if loss is None else loss:.4f}")
            val_losses.append(tuner.val_loss(val))
            tuner.end_epoch(epoch, losses, val_losses[-1], min(val_losses[:-1], default=math.inf))
    return val_losses
