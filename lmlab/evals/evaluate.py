"""Loss, perplexity, next-token accuracy and bits per byte of a model on a token split."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmlab.core.device import autocast
from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError
from lmlab.data.loader import check_block_size, open_tokens, pad_targets
from lmlab.data.shards import TokenShards, read_meta, row_layout
from lmlab.data.tokenizers import tokenizer_identity
from lmlab.model import LanguageModel
from lmlab.model.loss import IGNORE, next_token_hits, next_token_loss
from lmlab.model.memory import check_fits, scoring_need
from lmlab.run.rundir import LoadedRun


def split_windows(tokens: np.ndarray | TokenShards, block_size: int) -> int:
    """How many windows `evaluate_split` cuts a split into: consecutive windows of block_size targets, or the rows
    of a row-packed split."""
    rows = getattr(tokens, "rows", None)
    return (len(tokens) - 1) // block_size if rows is None else len(tokens) // rows.length


def spread(total: int, wanted: int) -> list[int]:
    """`wanted` of `total` window indices spread evenly over them (the first always): the subset `eval
    --max-tokens` scores, the same every time, from every part of the split."""
    n = min(total, wanted)
    return [i * total // n for i in range(n)]


class Ranks(Protocol):
    """The processes of a torchrun job that score a split together (`train.distributed.Parallel`)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def evaluate_split(model: LanguageModel, tokens: np.ndarray | TokenShards, bytes_per_token: float, batch_size: int,
                   device: torch.device, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None,
                   windows: list[int] | None = None, ranks: Ranks | None = None,
                   forward: Callable | None = None) -> dict[str, float]:
    """Score every token of a split once, in consecutive windows of block_size (of a row-packed split: every
    row, its padding not counted); or only the `windows` given (indices from `spread`), with the standard error
    of the loss that sampling them leaves (0 for the whole split). Under torchrun (`ranks`) rank r scores batches
    r, r + N, ..., every rank as many forwards (FSDP's all-gathers need them), through `forward` (the model as
    wrapped for the job), and the sums are all-reduced.

    Bits per byte divides the loss in bits by the UTF-8 bytes each token stands for on average in this
    split, so models with different tokenizers can be compared on the same text.
    """
    T, rows, forward = model.config.block_size, getattr(tokens, "rows", None), forward or model
    step = rows.length if rows else T  # stream windows overlap by one token: the last target is the next input
    total = split_windows(tokens, T)
    chosen = list(range(total)) if windows is None else windows
    rank, world = (ranks.rank, ranks.world_size) if ranks else (0, 1)
    n_batches = -(-len(chosen) // batch_size)
    # Per window i, its loss sum s_i and target count c_i, as sums: s, c, s², sc, c², correct guesses (in float64,
    # on the host: not every device has it).
    sums = torch.zeros(6, dtype=torch.float64)
    for b in range(rank, -(-n_batches // world) * world, world):
        counted = b < n_batches
        batch_windows = chosen[b * batch_size:(b + 1) * batch_size] if counted else chosen[:1]
        batch = torch.from_numpy(np.stack([tokens[w * step:w * step + T + 1] for w in batch_windows])
                                 .astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if rows:
            y = pad_targets(x, y, rows.pad_id)
        with autocast(device, dtype):
            logits = forward(x)[0]
        if counted:
            s, correct = score(logits, y)
            s, c = s.cpu().double(), (y != IGNORE).sum(1).cpu().double()
            sums += torch.stack([s.sum(), c.sum(), (s * s).sum(), (s * c).sum(), (c * c).sum(), correct.cpu()])
        if progress:
            progress(min((b + 1) * batch_size, len(chosen)), len(chosen))
    if ranks:
        sums = ranks.all_reduce_sum(sums.to(device)).cpu()
    s, c, ss, sc, cc, correct = sums.tolist()
    loss, n = s / c, len(chosen)
    # The ratio estimator's standard error, sampled without replacement from the split's windows.
    scatter = max(0.0, ss - 2 * loss * sc + loss * loss * cc)  # the windows' sum of (s_i - loss * c_i)²
    stderr = math.sqrt((1 - n / total) * n / (n - 1) * scatter) / c if 1 < n < total else 0.0
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / c,
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": int(c), "stderr": stderr}


def score(logits: torch.Tensor, targets: torch.Tensor, max_elements: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed loss and the correct next-token guesses of (B, T, vocab) logits (device tensors, read
    without a sync), a few sequences at a time.

    The loss is computed in fp32, and log-softmax makes another tensor the size of its input: over a whole
    batch of GPT-2 small (32 x 1024 x 50257) that is 13 GB on top of the logits. Chunks of at most
    `max_elements` logits (1 GiB in fp32) keep it small.
    """
    rows = max(1, max_elements // (logits.size(1) * logits.size(2)))
    chunks = list(zip(logits.split(rows), targets.split(rows)))
    losses = [next_token_loss(chunk, y, reduction="none").view_as(y).sum(1) for chunk, y in chunks]
    return torch.cat(losses), torch.stack([next_token_hits(chunk, y) for chunk, y in chunks]).sum()


def evaluate_run(run: LoadedRun, dataset: Path | None = None, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None, fresh: bool = True,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """Evaluate a run on the val split of its own dataset or of another one with the same tokenizer, and keep the
    result in the run (`RunDir.keep`; `not_kept` says why it could not be); unless `fresh`, a kept
    result of the same weights on the same split (or subset) in the same dtype is returned instead (with
    `"cached": true`). With `max_tokens`, only about that many tokens are scored: whole windows of block_size
    spread evenly over the split (`spread`), kept apart from whole-split results."""
    dataset, meta, key = _dataset(run, dataset, max_tokens)
    if not fresh and (kept := kept_evaluation(run, key)):
        return kept
    # Token ids only mean the same thing under the same vocabulary: a dataset tokenized otherwise is refused.
    if tokenizer_identity(run.run.path / "tokenizer.json") != tokenizer_identity(dataset / "tokenizer.json"):
        raise UserError(f"dataset {dataset} was tokenized with a different tokenizer than run {run.run.path} "
                        f"(the dataset's {meta['tokenizer']}, {meta['vocab_size']:,} tokens; the run's "
                        f"{run.tokenizer.spec}, {run.tokenizer.vocab_size:,} tokens; their vocabularies "
                        "differ); prepare it with the run's tokenizer.")
    T = run.config.model.block_size
    check_block_size(row_layout(meta), T, f"dataset {dataset}")
    tokens = open_tokens(dataset, "val", meta["dtype"])
    total = split_windows(tokens, T)
    windows = None if max_tokens is None else spread(total, -(-max_tokens // T))
    # The weights are loaded already: only the windows are checked.
    check_fits(dataclasses.replace(scoring_need(run.config.model), fixed=0), min(batch_size, total),
               "--batch-size", f"window of {T:,} tokens", run.device)
    scores = evaluate_split(run.model, tokens, meta["val"]["bytes"] / meta["val"]["tokens"], batch_size, run.device,
                            run.dtype, progress, windows)
    result = {"run": str(run.run.path), "checkpoint": run.checkpoint, "step": run.step, "dataset": str(dataset),
              **key, **scores, "windows": total if windows is None else len(windows), "split_windows": total,
              "split_tokens": meta["val"]["tokens"]}
    try:
        run.run.keep("results", result)
    except WriteError as err:  # a run folder that is read-only to this user: the result is still the result
        return {**result, "cached": False, "not_kept": err.not_kept()}
    return {**result, "cached": False}


def _dataset(run: LoadedRun, dataset: Path | None, max_tokens: int | None
             ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The dataset a run is evaluated on (its own unless given), its meta.json, and the key its kept evaluations are
    found by (`kept_evaluation`)."""
    if dataset is None and not run.config.data.dataset:
        raise UserError(f"{run.run.path} has no dataset of its own (it was imported, or fine-tuned from an imported "
                        "run); pass --dataset DIR, a dataset prepared with the run's tokenizer.")
    if dataset is None and not (Path(run.config.data.dataset) / "meta.json").exists():
        raise UserError(f"{run.run.path} was trained on {run.config.data.dataset}, which is not here (moved or "
                        "deleted); pass --dataset DIR, a dataset prepared with the run's tokenizer (`lmlab prepare "
                        f"CORPUS --tokenizer {run.run.path}` makes one), or put the dataset back.")
    dataset = dataset or Path(run.config.data.dataset)
    meta = read_meta(dataset)
    return dataset, meta, {"weights_sha256": run.weights_sha256, "val_sha256": meta["val"]["sha256"],
                           "dtype": str(run.dtype).removeprefix("torch."), "max_tokens": max_tokens}


def kept_evaluation(run: LoadedRun, key: dict[str, Any]) -> dict[str, Any] | None:
    """The newest kept evaluation matching `key` (weights, split, dtype, max_tokens), with `"cached": true`."""
    if not run.weights_sha256:
        return None
    kept = [r for r in run.run.kept("results") if all(r.get(k) == v for k, v in key.items())]
    return {**kept[-1], "cached": True} if kept else None


def evaluation_cost(run: LoadedRun) -> tuple[int, bool]:
    """The tokens a whole-split evaluation would score, and whether a kept result makes it free: what
    `lmlab report` says before it evaluates."""
    _, meta, key = _dataset(run, None, None)
    return meta["val"]["tokens"], kept_evaluation(run, key) is not None
