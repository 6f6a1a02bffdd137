"""Random (B, T) batches from a split's memory-mapped token shards, with a position that can be saved and restored."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmlab.data.shards import Rows, TokenShards, open_tokens  # noqa: F401  (its callers import it from here)
from lmlab.errors import UserError
from lmlab.model.loss import IGNORE


def check_block_size(rows: Rows | None, block_size: int, where: str) -> None:
    """A row-packed split fixes the context length: its rows are block_size + 1 tokens (inputs and targets)."""
    if rows is not None and rows.length != block_size + 1:
        raise UserError(f"{where} holds documents cropped to {rows.length - 1} tokens (--pack crop) but "
                        f"model.block_size is {block_size}; set model.block_size = {rows.length - 1} or prepare "
                        f"the dataset again with --pack crop --block-size {block_size}.")


def pad_targets(x: torch.Tensor, y: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Targets of row-packed (B, T) inputs with IGNORE wherever the input is at or past the row's first pad_id:
    its document's end-of-text is still a target, the padding after it is not."""
    return y.masked_fill((x == pad_id).cumsum(1) > 0, IGNORE)


class BatchLoader:
    """Samples windows (or, from a row-packed split, whole rows) uniformly at random; its whole position is the
    generator state, so resume is exact."""

    def __init__(self, tokens: np.ndarray | TokenShards, block_size: int, batch_size: int, seed: int, name: str = "data",
                 pin: bool = False):
        self.rows = getattr(tokens, "rows", None)
        if self.rows is None and len(tokens) < block_size + 2:
            raise UserError(
                f"the {name} split has {len(tokens)} tokens, fewer than model.block_size + 2 ({block_size + 2}); "
                "use a larger corpus or a smaller block_size."
            )
        check_block_size(self.rows, block_size, f"the {name} split")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.pin = pin  # page-locked batches copy to a GPU asynchronously (non_blocking=True)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the CPU; padding targets are IGNORE."""
        if self.rows is None:
            starts = self.rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size)
        else:
            starts = self.rng.integers(0, len(self.tokens) // self.rows.length, size=self.batch_size) * self.rows.length
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if self.rows is not None:
            x, y = batch[:, :-1], pad_targets(batch[:, :-1], batch[:, 1:], self.rows.pad_id)
            return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)
        if self.pin:
            batch = batch.pin_memory()
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
