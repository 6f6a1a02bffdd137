"""Loss, perplexity, next-token accuracy and bits per byte of a model on a token split."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmlab.data.loader import BatchLoader, check_block_size, open_tokens, pad_targets
from lmlab.data.prepare import read_meta
from lmlab.data.shards import row_layout
from lmlab.data.tokenizers import tokenizer_identity
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.errors import UserError
from lmlab.model import LanguageModel
from lmlab.model.loss import IGNORE, next_token_loss
from lmlab.runs import load_run_model, load_run_tokenizer

if TYPE_CHECKING:
    from lmlab.train.distributed import Parallel


@torch.no_grad()
def estimate_loss(forward: Callable, tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int,
                  seed: int, device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None) -> float:
    """Mean loss of `forward` (a model, compiled or not) over `n_batches` random batches drawn from a fixed
    seed: the same batches at every call.

    Under torchrun rank r scores batches r, r + N, ... and the sums are all-reduced. Every rank runs the same
    number of forwards, the last round padded with batches that do not count, as FSDP's all-gathers need."""
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    loader = BatchLoader(tokens, block_size, batch_size, seed)
    total = torch.zeros((), device=device)
    for i in range(-(-n_batches // world) * world):
        x, y = loader.next()
        if i % world != rank:
            continue
        with autocast(device, dtype):
            _, loss = forward(x.to(device), y.to(device))
        if i < n_batches:
            total += loss
    if parallel:
        total = parallel.all_reduce_sum(total)
    return (total / n_batches).item()


@torch.no_grad()
def evaluate_split(model: LanguageModel, tokens: np.ndarray, bytes_per_token: float, batch_size: int,
                   device: torch.device, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score every token of a split once, in consecutive windows of block_size (of a row-packed split: every
    row, its padding not counted).

    Bits per byte divides the loss in bits by the UTF-8 bytes each token stands for on average in this
    split, so models with different tokenizers can be compared on the same text.
    """
    T, rows = model.config.block_size, getattr(tokens, "rows", None)
    step = rows.length if rows else T  # stream windows overlap by one token: the last target is the next input
    n_windows = (len(tokens) - 1) // T if rows is None else len(tokens) // step
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, n_windows, batch_size):
        windows = [tokens[w * step:w * step + T + 1] for w in range(first, min(first + batch_size, n_windows))]
        batch = torch.from_numpy(np.stack(windows).astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if rows:
            y = pad_targets(x, y, rows.pad_id)
        with autocast(device, dtype):
            logits, _ = model(x)
        loss_sum += next_token_loss(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()  # an IGNORE target never equals a token id
        count += (y != IGNORE).sum().item()
        if progress:
            progress(min(first + batch_size, n_windows), n_windows)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count,
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": count}


def _check_same_tokenizer(run_dir: Path, dataset: Path, meta: dict[str, Any]) -> None:
    """Token ids only mean the same thing under the same vocabulary: refuse a dataset tokenized otherwise."""
    theirs = load_run_tokenizer(run_dir)
    if tokenizer_identity(run_dir / "tokenizer.json") != tokenizer_identity(dataset / "tokenizer.json"):
        raise UserError(f"dataset {dataset} was tokenized with a different tokenizer than run {run_dir} (the dataset's "
                        f"{meta['tokenizer']}, {meta['vocab_size']:,} tokens; the run's {theirs.spec}, "
                        f"{theirs.vocab_size:,} tokens; their vocabularies differ); prepare it with the run's tokenizer.")


def evaluate_run(run_dir: Path, dataset: Path | None = None, checkpoint: str = "best", batch_size: int = 32,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate a run on the val split of its own dataset or of another one with the same tokenizer."""
    torch_device = resolve_device(device)
    model, cfg, state = load_run_model(run_dir, checkpoint, torch_device)
    if dataset is None and not cfg.data.dataset:
        raise UserError(f"{run_dir} has no dataset of its own (it was imported, or fine-tuned from an imported run); pass --dataset DIR, a dataset "
                        "prepared with the run's tokenizer.")
    dataset = dataset or Path(cfg.data.dataset)
    meta = read_meta(dataset)
    _check_same_tokenizer(run_dir, dataset, meta)
    check_block_size(row_layout(meta), cfg.model.block_size, f"dataset {dataset}")
    tokens = open_tokens(dataset, "val", meta["dtype"])
    scores = evaluate_split(model, tokens, meta["val"]["bytes"] / meta["val"]["tokens"], batch_size, torch_device,
                            autocast_dtype(torch_device, cfg.train.dtype), progress)
    return {"run": str(run_dir), "checkpoint": checkpoint, "step": state["step"], "dataset": str(dataset), **scores}
