"""The transformer's decode state: every layer's keys and values for a batch of sequences, each row at its own
position (gpt.py's attention fills and reads it while decoding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.core.config import ModelConfig
from lmlab.model.base import DecodeState


class KVCache(DecodeState):
    """Keys and values of every layer (the n_kv_head shared heads) for a batch of sequences, preallocated to the
    context length: row b holds `pos[b]` tokens. Per-row offsets rather than left padding, so batching changes no
    logit beyond summation order, a row can leave or start anew without shifting the others, and no compute goes
    to pad tokens; the cost is one mask per step, shared by every layer (none for a prompt into an empty cache,
    which leaves SDPA free to pick flash attention)."""

    def __init__(self, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        # One position more than the context, never written: a step reads a view of at most block_size positions
        # (`shortened`), so every view it is given is a part of the tensor, with the same strides at every length, and
        # one step compiled for a length that varies serves them all (a view of the whole tensor would be the one
        # contiguous case, which compiled code specialises on).
        shape = (batch, config.kv_heads, config.block_size + 1, config.head_size)
        # One tensor per layer: a compiled step updates each in place, where a slice of one tensor holding every
        # layer was copied whole each step.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.last = torch.zeros(batch, dtype=torch.long, device=device)  # the token each row was fed last (a bigram's)
        self.where = self.mask = torch.empty(0)  # the step being run: set by `advance`
        self.empty = True  # known on the host to hold nothing, so no mask is needed (and no sync to find out)
        self.fresh = False  # the step being run starts from an empty cache

    def tensors(self) -> list[torch.Tensor]:
        return [self.pos, self.last, *self.k, *self.v]

    @classmethod
    def over(cls, tensors: Sequence[torch.Tensor]) -> KVCache:
        cache = object.__new__(cls)
        layers = (len(tensors) - 2) // 2
        cache.pos, cache.last = tensors[0], tensors[1]
        cache.k, cache.v = list(tensors[2:2 + layers]), list(tensors[2 + layers:])
        cache.where = cache.mask = torch.empty(0)
        cache.empty = cache.fresh = False
        return cache

    def length_dims(self) -> list[int | None]:
        return [None, None] + [2] * (len(self.k) + len(self.v))

    def reset(self, row: int) -> None:
        self.pos[row] = 0  # the old keys are masked out, then overwritten
        self.empty = len(self.pos) == 1

    def move(self, src: int, dst: int, length: int) -> None:
        for cached in (*self.k, *self.v):
            cached[dst, :, :length] = cached[src, :, :length]
        self.pos[dst], self.last[dst] = self.pos[src], self.last[src]

    def advance(self, length: int) -> torch.Tensor:
        """The positions (B, T) of the `length` tokens each row is fed now; moves the rows past them."""
        self.where = self.pos[:, None] + torch.arange(length, device=self.pos.device)
        self.fresh, self.empty = self.empty, False
        if not self.fresh:
            # The query at position p sees its row's keys 0..p (keys beyond p are an earlier sequence's).
            keys = torch.arange(self.k[0].size(2), device=self.pos.device)
            self.mask = (keys <= self.where[..., None]).unsqueeze(1)  # (B, 1, T, L), L the positions held in view
        self.pos += length
        return self.where

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nkv, T, hs) keys/values at the rows' positions; return the layer's cache in view, in theirs."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        held, dtype = self.k[layer].dtype, k.dtype
        if held != dtype:  # int8 decoding's bfloat16 cache: converted as stored and as read (compiled, as loaded); a
            k, v = k.to(held), v.to(held)  # cache in the step's dtype traces no conversion, its graph as it was
        self.k[layer][rows, :, self.where] = k.transpose(1, 2)
        self.v[layer][rows, :, self.where] = v.transpose(1, 2)
        return (self.k[layer], self.v[layer]) if held == dtype else (self.k[layer].to(dtype), self.v[layer].to(dtype))
