"""Random (B, T) batches from a split's memory-mapped token shards, with a position that can be saved and restored."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmlab.data.shards import TokenShards, open_tokens  # noqa: F401  (its callers import it from here)
from lmlab.errors import UserError


class BatchLoader:
    """Samples windows uniformly at random; its whole position is the generator state, so resume is exact."""

    def __init__(self, tokens: np.ndarray | TokenShards, block_size: int, batch_size: int, seed: int, name: str = "data",
                 pin: bool = False):
        if len(tokens) < block_size + 2:
            raise UserError(
                f"the {name} split has {len(tokens)} tokens, fewer than model.block_size + 2 ({block_size + 2}); "
                "use a larger corpus or a smaller block_size."
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.pin = pin  # page-locked batches copy to a GPU asynchronously (non_blocking=True)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the CPU."""
        starts = self.rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size)
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if self.pin:
            batch = batch.pin_memory()
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
