"""Instruction fine-tuning on Alpaca-format records: the loss on the response and its end marker only, a held-out split
scored each epoch (the best epoch is `best`), the prompt format kept in RUN/prompt.json. The same command again
continues an unfinished fine-tune from its newest checkpoint to the weights an uninterrupted one reaches.

The records, their template and the base weights are the fine-tune's own; its loop (steps, an evaluation at
each epoch's end, checkpoints, resume, stop signals, threads, attention path, LR schedule) is the `Trainer`'s."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.nn.utils.rnn import pad_sequence

from lmlab.core.config import FinetuneConfig, RunConfig, TrainConfig
from lmlab.core.device import autocast
from lmlab.core.errors import UserError
from lmlab.core.fileio import read_text, sha256_file
from lmlab.core.jsontext import json_sha256, parse_json
from lmlab.core.threads import ThreadChooser
from lmlab.data.tokenizers import Tokenizer
from lmlab.model import LanguageModel
from lmlab.model.loss import IGNORE, next_token_hits
from lmlab.model.memory import check_training
from lmlab.run.prompt import PromptFormat, alpaca_format, check_format, read_records
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.train.distributed import Parallel, setup
from lmlab.train.estimate import Estimate
from lmlab.train.loop import Trainer
from lmlab.train.optim import optimizer_of
from lmlab.train.preflight import Job, holding, measure_hardware, say_step
from lmlab.train.reports import TrainResult
from lmlab.train.state import Checkpointed
from lmlab.train.step import TrainStep
from lmlab.train.stop import StopOnSignal

Records = list[dict[str, str]]
Examples = list[tuple[list[int], list[bool]]]


def split_records(records: Records, val_fraction: float) -> tuple[Records, Records]:
    """Hold out records chosen by a hash of their content: the same file always splits the same way."""
    if len(records) < 2:
        raise UserError(f"a held-out split needs at least 2 records; the file has {len(records)}.")
    order = sorted(range(len(records)), key=lambda i: json_sha256(records[i]))
    val = set(order[:max(1, round(val_fraction * len(records)))])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def encode_example(tokenizer: Tokenizer, fmt: PromptFormat, record: dict[str, str]) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + response + end marker, and which of them the loss is taken on (response and end)."""
    prompt = tokenizer.encode(fmt.render(record["instruction"], record.get("input", "")))
    answer = tokenizer.encode(record["output"] + fmt.end)
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def _batch(examples: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) padded to the longest example; targets of prompt and padding are IGNORE."""
    x = [torch.tensor(ids[:-1], dtype=torch.long) for ids, _ in examples]
    y = [torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], scored[1:])], dtype=torch.long)
         for ids, scored in examples]
    return pad_sequence(x, batch_first=True), pad_sequence(y, batch_first=True, padding_value=IGNORE)




class RecordBatches:
    """The fine-tune's batch source, in BatchLoader's role: its training examples in a new shuffle each epoch, a
    padded batch of `batch_size` at a time. Its position is the epoch and the batch in it (an epoch's order is drawn
    from the seed and the epoch, so a restored position goes on with the same batches)."""

    def __init__(self, examples: Examples, batch_size: int, seed: int, device: torch.device):
        self.examples, self.batch_size, self.seed, self.device = examples, batch_size, seed, device
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self.scored_tokens = sum(sum(scored[1:]) for _, scored in examples)  # what an epoch trains on
        self.epoch, self.batch, self.scored = 0, 0, 0  # `scored`: the loss's tokens in the last batch
        self.shuffled: tuple[int, Examples] = (-1, [])  # an epoch and its order

    def skip(self) -> None:
        """Past the next batch, unbuilt."""
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self.batch += 1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.skip()
        if self.shuffled[0] != self.epoch:  # a new epoch, or a restored position: its order, drawn from the seed
            order = self.examples[:]
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            self.shuffled = self.epoch, order
        first = (self.batch - 1) * self.batch_size
        x, y = _batch(self.shuffled[1][first:first + self.batch_size])
        self.scored = int((y != IGNORE).sum())
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


@torch.no_grad()
def held_out_loss(model: LanguageModel, examples: Examples, batch_size: int, device: torch.device,
                  dtype: torch.dtype) -> Estimate:
    """Loss and next-token accuracy per scored token over the held-out examples."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)  # the scored tokens' summed loss, hits and count
    for first in range(0, len(examples), batch_size):
        x, y = (t.to(device) for t in _batch(examples[first:first + batch_size]))
        with autocast(device, dtype):
            logits, loss = model(x, y)
        n = (y != IGNORE).sum()
        total += torch.stack([loss.double() * n, next_token_hits(logits, y).double(), n.double()]).cpu()
    model.train()
    return Estimate(*(total[:2] / total[2]).tolist())


@dataclass
class FinetuneResult(TrainResult):
    base_val_loss: float = math.nan  # of the base model, before any update
    val_losses: list[float] = dataclasses.field(default_factory=list)  # one per finished epoch
    best_epoch: int = 0
    dropped: int = 0  # records longer than the context, left out


@dataclass
class Epochs(Checkpointed):
    """The held-out loss of the base model and of each finished epoch: a part of every checkpoint."""

    base_val_loss: float = math.nan
    val_losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> int:
        """The best epoch, from 1; 0 before the first."""
        return 1 + self.val_losses.index(min(self.val_losses)) if self.val_losses else 0


def _fitting(tokenizer: Tokenizer, fmt: PromptFormat, ft: FinetuneConfig,
             block_size: int) -> tuple[dict[str, Examples], int]:
    """The encoded train and held-out records that fit the context, and how many did not."""
    records = read_records(Path(ft.data))
    for i, record in enumerate(records):  # a char tokenizer cannot write every text: name the record
        for key in ("instruction", "input", "output"):
            tokenizer.check(record.get(key, ""), f"{ft.data}: record {i}'s `{key}`")
    encoded = {name: [encode_example(tokenizer, fmt, r) for r in part]
               for name, part in zip(("train", "val"), split_records(records, ft.val_fraction))}
    # Learned positions end at block_size: a longer example cannot be trained on whole, so it is left out.
    fits = {name: [e for e in examples if len(e[0]) <= block_size + 1] for name, examples in encoded.items()}
    if not fits["train"] or not fits["val"]:
        raise UserError(f"no {'training' if not fits['train'] else 'held-out'} record of {ft.data} fits the model's "
                        f"context of {block_size} tokens; use shorter records.")
    return fits, sum(len(encoded[n]) - len(fits[n]) for n in encoded)


def _continuing(run: RunDir, ft: FinetuneConfig, origin: dict[str, Any]) -> bool:
    """Whether `run` holds an unfinished fine-tune made by this command (continue it), or nothing yet (start it);
    anything else there is refused."""
    if not run.step_folders():
        return False
    if run.kind() != "fine-tuned" or not run.unfinished():
        run.check_new()  # says what the run is and where to go instead
    theirs = run.events(limit=1)[0].get("origin") or {}
    # Before the fine-tune trained through the Trainer, its checkpoints held a `position` the Trainer cannot read.
    saved = parse_json(read_text(run.checkpoint("latest") / "state.json")).get("training") or {}
    if "base" not in theirs or "position" in saved:
        raise UserError(f"{run.path} holds an unfinished fine-tune written by an earlier version of lmlab, whose "
                        "fine-tunes cannot be continued; choose a new --out.")
    # What may differ: the threads, and the attention path a continued fine-tune takes from its checkpoint.
    theirs_ft = run.config().finetune
    assert theirs_ft is not None, "a fine-tuned run's config has its [finetune]"
    old = dataclasses.replace(theirs_ft, checkpoint_interval=ft.checkpoint_interval, threads=ft.threads,
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



def _finetune_config(base: RunConfig, ft: FinetuneConfig, steps_per_epoch: int) -> RunConfig:
    """The base run's config with the [train] the fine-tune trains by: a warmup of 5% of the steps, then a cosine to a
    tenth of the peak over the whole fine-tune; an evaluation of the held-out records at each epoch's end, never an
    early stop, with a train line (its grad norm) in every epoch; uncompiled, as the padded batches change length
    from step to step."""
    total = ft.epochs * steps_per_epoch
    train = dataclasses.replace(base.train, learning_rate=ft.learning_rate, min_lr=ft.learning_rate / 10,
                                schedule="cosine", decay_fraction=TrainConfig.decay_fraction,
                                warmup_iters=total // 20, warmup_epochs=0.0, max_iters=total,
                                lr_decay_iters=0, batch_size=ft.batch_size, grad_accum_steps=1, seed=ft.seed,
                                compile=False, attention=ft.attention, threads=ft.threads,
                                eval_interval=steps_per_epoch, checkpoint_interval=ft.checkpoint_interval,
                                log_interval=min(base.train.log_interval, steps_per_epoch),
                                patience=0, budget_seconds=0.0, tracker="none")
    return dataclasses.replace(base, train=train, finetune=ft)


@dataclass(frozen=True, kw_only=True)
class Tune(Job):
    """A fine-tune's job: the base run's `best` model (`base`, of `base_dir`) and its prompt format, the records that
    fit its context (the train ones the loader's, `held_out` the others; `dropped`, how many did not fit), and what
    it came from (`origin`, its start event's: the same command again must find the same)."""

    base: LoadedRun
    base_dir: Path
    format: PromptFormat
    held_out: Examples
    dropped: int
    origin: dict[str, Any]


def finetune_job(base_dir: Path, run_dir: Path, ft: FinetuneConfig, device: str, console: Console) -> Tune:
    """The job of fine-tuning `base_dir`'s best model on `ft.data` into `run_dir`, the run's lock held from the start:
    the config it trains by, its records' batches, its machine (in the base run's dtype) and whether it continues an
    unfinished fine-tune of the same command."""
    run, threads = RunDir(run_dir), ThreadChooser(ft.threads, "finetune.threads")  # its count fixes a step's bits
    with holding(run, Parallel(), threads) as held:
        base_cfg = RunDir(base_dir).config()
        parallel, where = setup(device, base_cfg.train.collective_timeout)
        torch.manual_seed(ft.seed)
        check_training(base_cfg.model, ft.batch_size, optimizer_of(base_cfg.train).state_bytes, where,
                       setting="finetune.batch_size")
        base = RunDir(base_dir).load("best", device)
        assert base.tokenizer is not None, "loaded with its tokenizer"
        fmt = alpaca_format(base.tokenizer)
        check_format(base.tokenizer, fmt, base.run.path)
        fits, dropped = _fitting(base.tokenizer, fmt, ft, base.config.model.block_size)
        records = RecordBatches(fits["train"], ft.batch_size, ft.seed, where)
        cfg = _finetune_config(base.config, ft, records.steps_per_epoch)
        origin: dict[str, Any] = {
            "data": ft.data, "data_sha256": sha256_file(Path(ft.data)), "train_records": len(fits["train"]),
            "val_records": len(fits["val"]), "dropped_records": dropped, "epochs": ft.epochs,
            "prompt_format": fmt.name, "base": str(Path(base_dir).resolve()), "base_checkpoint": base.checkpoint,
            "base_weights_sha256": base.weights_sha256}
        machine = measure_hardware(parallel, where, base.dtype, None, threads)
        machine.start()
        step = TrainStep(base.model.train(), cfg.train, machine, attention_setting="finetune.attention")
        say_step(step, console)
        # A pass is an epoch: the tokens the loss is taken on; a step's, on average.
        return Tune(cfg, run_dir=run, console=console, held=held, parallel=parallel, machine=machine,
                    meta=base.run.dataset(), model=base.model, step=step, loader=records,
                    splits={}, micro_steps=1,
                    tokens_per_step=round(records.scored_tokens / records.steps_per_epoch),
                    split_tokens=records.scored_tokens, data_sha256=origin["data_sha256"], started=time.perf_counter(),
                    resume=_continuing(run, ft, origin), base=base, base_dir=Path(base_dir), format=fmt,
                    held_out=fits["val"], dropped=dropped, origin=origin)


class Finetuner(Trainer):
    """A fine-tune (`Tune`), trained by the Trainer's loop. Its own: how it begins (the base model's held-out loss)
    or continues, the evaluation (the held-out records, once an epoch), a step's tokens and the end event's
    fields."""

    DOING = "fine-tuning"
    job: Tune

    def __init__(self, job: Tune):
        self.epochs = Epochs()
        super().__init__(job)

    def _state_parts(self) -> dict[str, Checkpointed]:
        return {"epochs": self.epochs}

    def _start(self) -> None:
        """The start event, with what the fine-tune came from; then the base model's loss on the held-out records."""
        job, base = self.job, self.job.base
        if base.checkpoint != "best":
            job.console.print(f"note: {job.base_dir} has no best checkpoint (it was never evaluated); fine-tuning "
                              f"its latest (step {base.step})")
        if unfinished := base.run.unfinished():
            job.console.print(f"note: {job.base_dir} is {unfinished}, not a finished result; fine-tuning its "
                              f"{base.checkpoint} checkpoint (step {base.step}) as it stands", highlight=False)
        job.run_dir.begin("fine-tuned", job.model, self.cfg, job.meta, init_from=str(job.base_dir),
                          device=job.step.device, dtype=job.step.dtype, origin=job.origin)
        self.epochs.base_val_loss = self._held_out().loss
        job.console.print(f"base model val loss on the held-out records: {self.epochs.base_val_loss:.4f}")

    def _write_setup(self) -> None:
        job = self.job
        job.run_dir.write_setup(self.cfg, job.base.run.path / "tokenizer.json", job.meta, job.format)

    def _restore(self) -> Path:
        return self.checkpointer.restore_newest()[0]  # what it continues was checked by `_continuing`

    def _held_out(self) -> Estimate:
        job = self.job
        with self._stop.interruptible():
            return held_out_loss(job.model, job.held_out, self.cfg.train.batch_size, job.step.device, job.step.dtype)

    def _step_tokens(self) -> int:
        assert isinstance(self.job.loader, RecordBatches), "a fine-tune's batches are its records'"
        return self.job.loader.scored

    def _evaluate(self) -> tuple[Estimate | None, Estimate]:
        """An epoch's end: the held-out records scored (no train split to score)."""
        val = self._held_out()
        self.epochs.val_losses.append(val.loss)
        return None, val

    def _score_final(self, stopped: Callable[[], bool]) -> dict[str, Any] | None:
        return None  # the held-out records were scored at the last epoch's end

    def _end_fields(self) -> dict[str, Any]:
        return {"best_epoch": self.epochs.best, "base_val_loss": self.epochs.base_val_loss}

    def result(self, trained: TrainResult) -> FinetuneResult:
        return FinetuneResult(**vars(trained), base_val_loss=self.epochs.base_val_loss,
                              val_losses=self.epochs.val_losses, best_epoch=self.epochs.best, dropped=self.job.dropped)


def finetune(base_dir: Path, run_dir: Path, ft: FinetuneConfig, device: str = "auto",
             console: Console | None = None) -> FinetuneResult:
    """Fine-tune the `best` model of run `base_dir` on the Alpaca records `ft.data` into the new run `run_dir`, or
    continue an unfinished fine-tune there made by the same command."""
    if not ft.data:
        raise UserError("fine-tuning needs records: pass --data FILE.json or set finetune.data.")
    # A stop during the set-up ends it at once, nothing written; after `begun`, after the first step.
    with StopOnSignal(setting_up=True):
        tuner = Finetuner(finetune_job(base_dir, run_dir, ft, device, console or Console()))
        return tuner.result(tuner.run())
