"""Random (B, T) batches from a split's memory-mapped token shards, with a position that can be saved and restored; a
run's config resolved against its dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from lmlab.core.config import RunConfig
from lmlab.core.errors import UserError
from lmlab.data.shards import (
    Rows,
    TokenShards,
    open_tokens,  # noqa: F401  (its callers import it from here)
    read_meta,
    row_layout,
)
from lmlab.model.loss import IGNORE


def check_block_size(rows: Rows | None, block_size: int, where: str) -> None:
    """A row-packed split fixes the context length: its rows are block_size + 1 tokens (inputs and targets)."""
    if rows is not None and rows.length != block_size + 1:
        raise UserError(f"{where} holds documents cropped to {rows.length - 1} tokens (--pack crop) but "
                        f"model.block_size is {block_size}; set model.block_size = {rows.length - 1} or prepare "
                        f"the dataset again with --pack crop --block-size {block_size}.")


def resolve_config(cfg: RunConfig, meta: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """Fill model.vocab_size from the dataset and check that a given one covers its ids (an imported model may
    have more embedding rows than its tokenizer has tokens, as Qwen3's do), and that model.block_size fits the
    rows of a row-packed dataset; a warmup in passes made steps (warmup_iters: what the schedule, a checkpoint and
    config.toml hold from then on)."""
    meta = meta or read_meta(Path(cfg.data.dataset))
    tc = cfg.train
    if tc.warmup_epochs:
        steps = tc.warmup_steps(meta["train"]["tokens"], cfg.tokens_per_step)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, warmup_iters=steps, warmup_epochs=0.0))
    check_block_size(row_layout(meta), cfg.model.block_size, f"dataset {cfg.data.dataset}")
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but dataset {cfg.data.dataset} has {meta['vocab_size']} "
            "tokens, more than the model has rows for; point data.dataset at a dataset of the run's tokenizer."
        )
    return cfg, meta


def pad_targets(x: torch.Tensor, y: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Targets of row-packed (B, T) inputs with IGNORE wherever the input is at or past the row's first pad_id:
    its document's end-of-text is still a target, the padding after it is not."""
    return y.masked_fill((x == pad_id).cumsum(1) > 0, IGNORE)


class Batches(Protocol):
    """What the training loop draws its batches from (a `BatchLoader`, a fine-tune's records), its position saved
    with every checkpoint and restored from it."""

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def skip(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BatchLoader:
    """Samples windows (or, from a row-packed split, whole rows) uniformly at random; its whole position is the
    generator state, so resume is exact.

    Batches come on `device`. For a CUDA device the (B, T+1) batch is built in page-locked memory and copied
    whole with `non_blocking`, so the copy overlaps the step before it; inputs and targets are then two views
    of it on the device. (Slices of a pinned batch are not contiguous, and copying those goes through a
    pageable temporary, synchronously.)
    """

    def __init__(self, tokens: np.ndarray | TokenShards, block_size: int, batch_size: int, seed: int,
                 name: str = "data", device: torch.device | None = None):
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
        self.device = device or torch.device("cpu")

    def _starts(self) -> np.ndarray:
        if self.rows is None:
            return self.rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size)
        return self.rng.integers(0, len(self.tokens) // self.rows.length, size=self.batch_size) * self.rows.length

    def host_batch(self) -> torch.Tensor:
        """The next (B, T+1) windows as one contiguous int64 CPU tensor, page-locked for a CUDA device."""
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in self._starts()]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the loader's device; padding targets are IGNORE."""
        batch = self.host_batch().to(self.device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        return (x, pad_targets(x, y, self.rows.pad_id)) if self.rows is not None else (x, y)

    def skip(self) -> None:
        """Move past one batch without building it (a batch another torchrun rank trains on)."""
        self._starts()

    def state_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.rng.bit_generator.state)  # a dict; numpy's stubs say a Mapping

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
