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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

import lmlab
from lmlab.config import RunConfig, to_toml
from lmlab.data.tokenizers import EOT, Tokenizer
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text, sha256_file
from lmlab.model import LanguageModel
from lmlab.model.loss import IGNORE
from lmlab.plots import plot_losses
from lmlab.runs import MetricsLog, load_run_model, load_run_tokenizer
from lmlab.train.checkpoint import model_tensors, prune_checkpoints, save_checkpoint
from lmlab.train.loop import accumulate_gradients
from lmlab.train.optim import lr_at, make_optimizer


@dataclass
class PromptFormat:
    """How an instruction is put to the model, and what ends its answer."""

    name: str
    with_input: str  # has {instruction} and {input}
    without_input: str  # has {instruction}
    end: str  # appended to every response in training; generation stops there

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


def alpaca_format(tokenizer: Tokenizer) -> PromptFormat:
    """Stanford Alpaca's template. Tokenizers without an end-of-text token (char) end a response with a blank
    line instead, as char datasets separate documents."""
    head = "Below is an instruction that describes a task"
    return PromptFormat(
        name="alpaca",
        with_input=(f"{head}, paired with an input that provides further context. Write a response that "
                    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                    "### Input:\n{input}\n\n### Response:\n"),
        without_input=(f"{head}. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Response:\n"),
        end=EOT if tokenizer.eot_id is not None else "\n\n",
    )


def prompt_format(run_dir: Path, tokenizer: Tokenizer) -> PromptFormat:
    """The format a run was fine-tuned with (RUN/prompt.json), else Alpaca's for its tokenizer."""
    path = Path(run_dir) / "prompt.json"
    if not path.exists():
        return alpaca_format(tokenizer)
    try:
        return PromptFormat(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError):
        raise UserError(f"{path} is not a prompt format written by `lmlab finetune`; restore or delete it.")


def read_records(path: Path) -> list[dict[str, str]]:
    """Alpaca records from a JSON list; every problem names the file and the record."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a JSON file with a list of Alpaca records.")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file.")
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} records.")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise UserError(f"{path}: record {i} has no `instruction` text; every record needs one.")
        for key in ("input", "output"):
            if not isinstance(r.get(key, ""), str):
                raise UserError(f"{path}: record {i} has a non-text `{key}`; use a string.")
        if "output" not in r:
            raise UserError(f"{path}: record {i} has no `output`; fine-tuning needs the answer to learn.")
    return records


def split_records(records: list[dict[str, str]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out records chosen by a hash of their content: the same file always splits the same way."""
    if not 0.0 < val_fraction < 1.0 or len(records) < 2:
        raise UserError(f"a held-out split needs at least 2 records and 0 < --val-fraction < 1 "
                        f"(got {len(records)} records, {val_fraction}).")
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


class _Finetuner:
    """The state one fine-tuning run shares between its steps, evaluations and checkpoints."""

    def __init__(self, model: LanguageModel, cfg: RunConfig, run_dir: Path, device: torch.device, console: Console):
        self.model, self.cfg, self.run_dir, self.device, self.console = model, cfg, run_dir, device, console
        self.dtype = autocast_dtype(device, cfg.train.dtype)
        self.optimizer = make_optimizer(model, cfg.train)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.metrics = MetricsLog(run_dir)
        self.step, self.tokens, self.clock = 0, 0, time.perf_counter()

    def loss(self, examples: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, int]:
        x, y = (t.to(self.device) for t in _batch(examples))
        with autocast(self.device, self.dtype):
            _, loss = self.model(x, y)
        return loss, int((y != IGNORE).sum())

    @torch.no_grad()
    def val_loss(self, examples: list[tuple[list[int], list[bool]]]) -> float:
        """Mean loss per scored token over the held-out examples."""
        self.model.eval()
        total, count = 0.0, 0
        for first in range(0, len(examples), self.cfg.train.batch_size):
            loss, n = self.loss(examples[first:first + self.cfg.train.batch_size])
            total, count = total + loss.item() * n, count + n
        self.model.train()
        return total / count

    def train_step(self, examples: list[tuple[list[int], list[bool]]]) -> float:
        lr = lr_at(self.step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = _batch(examples)
        loss, _ = accumulate_gradients(self.model, self.model, self.optimizer, self.scaler, [(x, y)], 1, self.device,
                                       self.dtype, self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.tokens = self.step + 1, self.tokens + int((y != IGNORE).sum())
        self.metrics.append({"event": "train", "step": self.step, "tokens": self.tokens, "loss": loss.item(),
                             "lr": lr, "elapsed": round(time.perf_counter() - self.clock, 3)})
        return loss.item()

    def end_epoch(self, epoch: int, train_losses: list[float], val: float, best: float) -> None:
        is_best = val < best
        self.metrics.append({"event": "eval", "step": self.step, "epoch": epoch, "tokens": self.tokens,
                             "elapsed": round(time.perf_counter() - self.clock, 3),
                             "train_loss": sum(train_losses) / len(train_losses), "val_loss": val,
                             "best_val_loss": min(val, best), "is_best": is_best})
        self.metrics.append({"event": "checkpoint", "step": self.step, "best": is_best})
        state = {"finetune_epoch": epoch, "val_loss": val, "model_config": dataclasses.asdict(self.cfg.model),
                 "lmlab_version": lmlab.__version__}
        save_checkpoint(self.run_dir, self.step, model_tensors(self.model), self.optimizer.state_dict(), state,
                        is_best)
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        plot_losses(self.run_dir)
        mark = " | [bold green]best![/bold green]" if is_best else ""
        self.console.print(f"epoch {epoch} | train {sum(train_losses) / len(train_losses):.4f} | val {val:.4f}{mark}")


def _start_run(base: Path, run_dir: Path, cfg: RunConfig, fmt: PromptFormat, facts: dict[str, Any],
               model: LanguageModel) -> None:
    """Lay out the new run dir: config, the base's tokenizer and dataset facts, the prompt format, a start event."""
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already has checkpoints; pick a new --run for the fine-tuned model.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    for name in ("tokenizer.json", "dataset.json"):
        shutil.copyfile(base / name, run_dir / name)
    atomic_write_text(run_dir / "prompt.json", json.dumps(dataclasses.asdict(fmt), indent=2))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    MetricsLog(run_dir).append({
        "event": "start", "step": 0, "lmlab_version": lmlab.__version__, "device": str(next(model.parameters()).device),
        "params": model.num_params(), "params_non_embedding": model.num_params(embeddings=False),
        "dataset": cfg.data.dataset, "tokenizer": json.loads((base / "dataset.json").read_text())["tokenizer"],
        "init_from": str(base), "finetune": facts,
    })


def finetune(base: Path, data: Path, run_dir: Path, epochs: int = 3, learning_rate: float = 1e-4,
             batch_size: int = 8, val_fraction: float = 0.1, seed: int = 1337, device: str = "auto",
             console: Console | None = None) -> FinetuneResult:
    """Fine-tune the `best` model of run `base` on the Alpaca records in `data` into the new run `run_dir`."""
    console = console or Console()
    if epochs < 1 or batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1.")
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    base, run_dir = Path(base), Path(run_dir)
    model, cfg, _ = load_run_model(base, "best", torch_device)
    tokenizer = load_run_tokenizer(base)
    fmt = alpaca_format(tokenizer)
    train_records, val_records = split_records(read_records(data), val_fraction)
    encoded = {name: [encode_example(tokenizer, fmt, r) for r in records]
               for name, records in (("train", train_records), ("val", val_records))}
    # Learned positions end at block_size: a longer example cannot be trained on whole, so it is left out.
    fits = {name: [e for e in examples if len(e[0]) <= cfg.model.block_size + 1] for name, examples in encoded.items()}
    dropped = sum(len(encoded[n]) - len(fits[n]) for n in encoded)
    if not fits["train"] or not fits["val"]:
        raise UserError(f"no {'training' if not fits['train'] else 'held-out'} record of {data} fits the model's "
                        f"context of {cfg.model.block_size} tokens; use shorter records.")
    steps_per_epoch = math.ceil(len(fits["train"]) / batch_size)
    total = epochs * steps_per_epoch
    # A constant-then-cosine schedule over the whole fine-tune: warmup of 5% of the steps, decay to a tenth.
    train_cfg = dataclasses.replace(cfg.train, learning_rate=learning_rate, min_lr=learning_rate / 10,
                                    warmup_iters=total // 20, max_iters=total, lr_decay_iters=0,
                                    batch_size=batch_size, seed=seed)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    facts = {"data": str(data), "data_sha256": sha256_file(Path(data)), "train_records": len(fits["train"]),
             "val_records": len(fits["val"]), "dropped_records": dropped, "epochs": epochs, "prompt_format": fmt.name}
    _start_run(base, run_dir, cfg, fmt, facts, model)
    tuner = _Finetuner(model.train(), cfg, run_dir, torch_device, console)
    base_val = tuner.val_loss(fits["val"])
    console.print(f"base model val loss on the held-out records: {base_val:.4f}")
    val_losses = _epochs(tuner, fits["train"], fits["val"], epochs, steps_per_epoch, random.Random(seed))
    best_epoch = 1 + val_losses.index(min(val_losses))
    tuner.metrics.append({"event": "end", "step": tuner.step, "tokens": tuner.tokens,
                          "elapsed": round(time.perf_counter() - tuner.clock, 3), "best_val_loss": min(val_losses),
                          "best_epoch": best_epoch, "base_val_loss": base_val, "stopped_early": False,
                          "stopped_by": None})
    return FinetuneResult(run_dir, base_val, val_losses, best_epoch, dropped, plot_losses(run_dir))


def _epochs(tuner: _Finetuner, train: list, val: list, epochs: int, steps_per_epoch: int,
            rng: random.Random) -> list[float]:
    """Train epoch by epoch (shuffled each time) under a progress bar; returns each epoch's val loss."""
    columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
               TextColumn("ETA"), TimeRemainingColumn()]
    size = tuner.cfg.train.batch_size
    val_losses: list[float] = []
    with Progress(*columns, console=tuner.console, transient=True) as bar:
        task = bar.add_task("finetune", total=epochs * steps_per_epoch, info="")
        for epoch in range(1, epochs + 1):
            order = train[:]
            rng.shuffle(order)
            losses = []
            for first in range(0, len(order), size):
                losses.append(tuner.train_step(order[first:first + size]))
                bar.update(task, advance=1, info=f"epoch {epoch}/{epochs} | loss {losses[-1]:.4f}")
            val_losses.append(tuner.val_loss(val))
            tuner.end_epoch(epoch, losses, val_losses[-1], min(val_losses[:-1], default=math.inf))
    return val_losses
