"""Loss, perplexity, next-token accuracy and bits per byte of a model on a token split."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.core.device import autocast
from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError
from lmlab.data.loader import check_block_size, open_tokens, pad_targets
from lmlab.data.shards import read_meta, row_layout
from lmlab.data.tokenizers import tokenizer_identity
from lmlab.model import LanguageModel
from lmlab.model.loss import IGNORE, next_token_loss
from lmlab.model.memory import check_fits, scoring_need
from lmlab.run.rundir import LoadedRun


def split_windows(tokens: np.ndarray, block_size: int) -> int:
    """How many windows `evaluate_split` cuts a split into: consecutive windows of block_size targets, or the rows
    of a row-packed split."""
    rows = getattr(tokens, "rows", None)
    return (len(tokens) - 1) // block_size if rows is None else len(tokens) // rows.length


def spread(total: int, wanted: int) -> list[int]:
    """`wanted` of `total` window indices spread evenly over them (the first always): the subset `eval
    --max-tokens` scores, the same every time, from every part of the split."""
    n = min(total, wanted)
    return [i * total // n for i in range(n)]


@torch.no_grad()
def evaluate_split(model: LanguageModel, tokens: np.ndarray, bytes_per_token: float, batch_size: int,
                   device: torch.device, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None,
                   windows: list[int] | None = None) -> dict[str, float]:
    """Score every token of a split once, in consecutive windows of block_size (of a row-packed split: every
    row, its padding not counted); or only the `windows` given (indices from `spread`).

    Bits per byte divides the loss in bits by the UTF-8 bytes each token stands for on average in this
    split, so models with different tokenizers can be compared on the same text.
    """
    T, rows = model.config.block_size, getattr(tokens, "rows", None)
    step = rows.length if rows else T  # stream windows overlap by one token: the last target is the next input
    chosen = list(range(split_windows(tokens, T))) if windows is None else windows
    n_windows = len(chosen)
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, n_windows, batch_size):
        windows_ = [tokens[w * step:w * step + T + 1] for w in chosen[first:first + batch_size]]
        batch = torch.from_numpy(np.stack(windows_).astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if rows:
            y = pad_targets(x, y, rows.pad_id)
        with autocast(device, dtype):
            logits, _ = model(x)
        batch_loss, batch_correct = score(logits, y)
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        count += (y != IGNORE).sum().item()
        if progress:
            progress(min(first + batch_size, n_windows), n_windows)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count,
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": count}


def score(logits: torch.Tensor, targets: torch.Tensor, max_elements: int = 2**28) -> tuple[float, int]:
    """Summed loss and correct next-token guesses of (B, T, vocab) logits, a few sequences at a time.

    The loss is computed in fp32, and log-softmax makes another tensor the size of its input: over a whole
    batch of GPT-2 small (32 x 1024 x 50257) that is 13 GB on top of the logits. Chunks of at most
    `max_elements` logits (1 GiB in fp32) keep it small.
    """
    rows = max(1, max_elements // (logits.size(1) * logits.size(2)))
    loss, correct = 0.0, 0
    for first in range(0, logits.size(0), rows):
        chunk, y = logits[first:first + rows], targets[first:first + rows]
        loss += next_token_loss(chunk, y, reduction="sum").item()
        correct += (chunk.argmax(-1) == y).sum().item()  # an IGNORE target never equals a token id
    return loss, correct


def _check_same_tokenizer(run: LoadedRun, dataset: Path, meta: dict[str, Any]) -> None:
    """Token ids only mean the same thing under the same vocabulary: refuse a dataset tokenized otherwise."""
    theirs = run.tokenizer
    if tokenizer_identity(run.run.path / "tokenizer.json") != tokenizer_identity(dataset / "tokenizer.json"):
        raise UserError(f"dataset {dataset} was tokenized with a different tokenizer than run {run.run.path} (the "
                        f"dataset's {meta['tokenizer']}, {meta['vocab_size']:,} tokens; the run's {theirs.spec}, "
                        f"{theirs.vocab_size:,} tokens; their vocabularies differ); prepare it with the run's "
                        "tokenizer.")


def evaluate_run(run: LoadedRun, dataset: Path | None = None, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None, fresh: bool = True,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """Evaluate a run on the val split of its own dataset or of another one with the same tokenizer, and keep the
    result in the run (`RunDir.save_evaluation`; `not_kept` says why it could not be); unless `fresh`, a kept
    result of the same weights on the same split (or subset) in the same dtype is returned instead (with
    `"cached": true`). With `max_tokens`, only about that many tokens are scored: whole windows of block_size
    spread evenly over the split (`spread`), kept apart from whole-split results."""
    dataset, meta = _dataset(run, dataset)
    key = {"weights_sha256": run.weights_sha256, "val_sha256": meta["val"]["sha256"],
           "dtype": str(run.dtype).removeprefix("torch."), "max_tokens": max_tokens}
    kept = kept_evaluation(run, key)
    if kept and not fresh:
        return kept
    _check_same_tokenizer(run, dataset, meta)
    T = run.config.model.block_size
    check_block_size(row_layout(meta), T, f"dataset {dataset}")
    tokens = open_tokens(dataset, "val", meta["dtype"])
    total = split_windows(tokens, T)
    windows = None if max_tokens is None else spread(total, -(-max_tokens // T))
    need = scoring_need(run.config.model)  # the weights are loaded already: only the windows are checked
    check_fits(dataclasses.replace(need, fixed=0), min(batch_size, total), "--batch-size", f"window of {T:,} tokens",
               run.device)
    scores = evaluate_split(run.model, tokens, meta["val"]["bytes"] / meta["val"]["tokens"], batch_size, run.device,
                            run.dtype, progress, windows)
    result = {"run": str(run.run.path), "checkpoint": run.checkpoint, "step": run.step, "dataset": str(dataset),
              **key, **scores, "windows": total if windows is None else len(windows), "split_windows": total,
              "split_tokens": meta["val"]["tokens"]}
    try:
        run.run.save_evaluation(result)
    except WriteError as err:  # a run folder that is read-only to this user: the result is still the result
        return {**result, "cached": False, "not_kept": err.not_kept()}
    return {**result, "cached": False}


def _dataset(run: LoadedRun, dataset: Path | None) -> tuple[Path, dict[str, Any]]:
    """The dataset a run is evaluated on (its own unless given) and its meta.json."""
    if dataset is None and not run.config.data.dataset:
        raise UserError(f"{run.run.path} has no dataset of its own (it was imported, or fine-tuned from an imported "
                        "run); pass --dataset DIR, a dataset prepared with the run's tokenizer.")
    if dataset is None and not (Path(run.config.data.dataset) / "meta.json").exists():
        raise UserError(f"{run.run.path} was trained on {run.config.data.dataset}, which is not here (moved or "
                        "deleted); pass --dataset DIR, a dataset prepared with the run's tokenizer (`lmlab prepare "
                        f"CORPUS --tokenizer {run.run.path}` makes one), or put the dataset back.")
    dataset = dataset or Path(run.config.data.dataset)
    return dataset, read_meta(dataset)


def kept_evaluation(run: LoadedRun, key: dict[str, Any]) -> dict[str, Any] | None:
    """The newest kept evaluation matching `key` (weights, split, dtype, max_tokens), with `"cached": true`."""
    if not run.weights_sha256:
        return None
    kept = [r for r in run.run.evaluations() if all(r.get(k) == v for k, v in key.items())]
    return {**kept[-1], "cached": True} if kept else None


def evaluation_cost(run: LoadedRun, dataset: Path | None = None, max_tokens: int | None = None) -> tuple[int, bool]:
    """The tokens an evaluation would score, and whether a kept result makes it free: what `lmlab report` says
    before it evaluates."""
    dataset, meta = _dataset(run, dataset)
    key = {"weights_sha256": run.weights_sha256, "val_sha256": meta["val"]["sha256"],
           "dtype": str(run.dtype).removeprefix("torch."), "max_tokens": max_tokens}
    total = meta["val"]["tokens"]
    return (total if max_tokens is None else min(total, max_tokens)), kept_evaluation(run, key) is not None
