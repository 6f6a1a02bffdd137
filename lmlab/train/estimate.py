"""The loss and accuracy training logs at every evaluation: a fixed set of random batches per split."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from lmlab.core.device import autocast
from lmlab.data.loader import BatchLoader
from lmlab.data.shards import TokenShards
from lmlab.model.loss import IGNORE, next_token_hits
from lmlab.train.distributed import Parallel


class Estimate(NamedTuple):
    """A split's figures over the batches of one evaluation."""

    loss: float  # the mean of the batches' mean next-token losses
    accuracy: float  # the mean of the batches' shares of next tokens guessed right (the argmax), as the loss is


@torch.no_grad()
def estimate_loss(forward: Callable, tokens: np.ndarray | TokenShards, block_size: int, batch_size: int, n_batches: int,
                  seed: int, device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None) -> Estimate:
    """Mean loss and next-token accuracy of `forward` (a model, compiled or not) over `n_batches` random batches
    drawn from a fixed seed: the same batches at every call. The accuracy is read from the logits of the forward
    that gives the loss: no pass of its own.

    Under torchrun rank r scores batches r, r + N, ... and the sums are all-reduced. Every rank runs the same
    number of forwards, the last round padded with batches that do not count, as FSDP's all-gathers need."""
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    loader = BatchLoader(tokens, block_size, batch_size, seed, device=device)
    total = torch.zeros(2, device=device)  # the sums of the batches' loss and accuracy
    for i in range(-(-n_batches // world) * world):
        if i % world != rank:
            loader.skip()
            continue
        x, y = loader.next()
        with autocast(device, dtype):
            logits, loss = forward(x, y)
        if i < n_batches:
            total += torch.stack([loss.float(), next_token_hits(logits, y) / (y != IGNORE).sum().clamp(min=1)])
    if parallel:
        total = parallel.all_reduce_sum(total)
    loss, accuracy = (total / n_batches).tolist()
    return Estimate(loss, accuracy)
