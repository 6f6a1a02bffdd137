"""The loss estimate training logs at every evaluation: a fixed set of random batches per split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmlab.core.device import autocast
from lmlab.data.loader import BatchLoader
from lmlab.train.distributed import Parallel


@torch.no_grad()
def estimate_loss(forward: Callable, tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int,
                  seed: int, device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None) -> float:
    """Mean loss of `forward` (a model, compiled or not) over `n_batches` random batches drawn from a fixed
    seed: the same batches at every call.

    Under torchrun rank r scores batches r, r + N, ... and the sums are all-reduced. Every rank runs the same
    number of forwards, the last round padded with batches that do not count, as FSDP's all-gathers need."""
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    loader = BatchLoader(tokens, block_size, batch_size, seed, device=device)
    total = torch.zeros((), device=device)
    for i in range(-(-n_batches // world) * world):
        if i % world != rank:
            loader.skip()
            continue
        x, y = loader.next()
        with autocast(device, dtype):
            _, loss = forward(x, y)
        if i < n_batches:
            total += loss
    if parallel:
        total = parallel.all_reduce_sum(total)
    return (total / n_batches).item()
