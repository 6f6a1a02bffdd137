"""Loss, perplexity, next-token accuracy and bits per byte of a model on a token split."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.loader import BatchLoader, open_tokens
from lmlab.data.prepare import read_meta
from lmlab.device import autocast, autocast_dtype, resolve_device
from lmlab.errors import UserError
from lmlab.model import LanguageModel
from lmlab.runs import load_run_model


@torch.no_grad()
def estimate_loss(forward: Callable, tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int,
                  seed: int, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss of `forward` (a model, compiled or not) over `n_batches` random batches drawn from a fixed
    seed: the same batches at every call."""
    loader = BatchLoader(tokens, block_size, batch_size, seed)
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = loader.next()
        with autocast(device, dtype):
            _, loss = forward(x.to(device), y.to(device))
        total += loss
    return (total / n_batches).item()


@torch.no_grad()
def evaluate_split(model: LanguageModel, tokens: np.ndarray, bytes_per_token: float, batch_size: int,
                   device: torch.device, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score every token of a split once, in consecutive windows of block_size.

    Bits per byte divides the loss in bits by the UTF-8 bytes each token stands for on average in this
    split, so models with different tokenizers can be compared on the same text.
    """
    T = model.config.block_size
    n_windows = (len(tokens) - 1) // T
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, n_windows, batch_size):
        rows = np.stack([tokens[w * T:w * T + T + 1] for w in range(first, min(first + batch_size, n_windows))])
        batch = torch.from_numpy(rows.astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast(device, dtype):
            logits, _ = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        if progress:
            progress(min(first + batch_size, n_windows), n_windows)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count,
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": count}


def evaluate_run(run_dir: Path, dataset: Path | None = None, checkpoint: str = "best", batch_size: int = 32,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate a run on the val split of its own dataset or of another one with the same tokenizer."""
    torch_device = resolve_device(device)
    model, cfg, state = load_run_model(run_dir, checkpoint, torch_device)
    dataset = dataset or Path(cfg.data.dataset)
    meta = read_meta(dataset)
    trained_on = json.loads((run_dir / "dataset.json").read_text())
    if meta["tokenizer_sha256"] != trained_on["tokenizer_sha256"]:
        raise UserError(f"dataset {dataset} was tokenized with a different tokenizer than run {run_dir}; "
                        "prepare it with the run's tokenizer.")
    tokens = open_tokens(dataset, "val", meta["dtype"])
    scores = evaluate_split(model, tokens, meta["val"]["bytes"] / meta["val"]["tokens"], batch_size, torch_device,
                            autocast_dtype(torch_device, cfg.train.dtype), progress)
    return {"run": str(run_dir), "checkpoint": checkpoint, "step": state["step"], "dataset": str(dataset), **scores}
