"""A model compiled block by block, as torchtitan compiles one: each of its `shard_units` (the transformer blocks; the
whole model where it has none) compiled on its own, so every block replays one graph, and under FSDP the hooks that
gather a block's shards run outside it (a model compiled whole breaks into graphs at every such hook)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmlab.model import LanguageModel


class CompiledBlocks:
    """The model's blocks compiled in place (their `forward`, which leaves their hooks, names and state dict as they
    were), each by `mode` at each call: a torch.compile mode, or None for eager, so that a trial can time both.
    Evaluations (eval mode) run eager on a CPU, where compiling the eval-mode graph too costs more than a few batches
    gain."""

    def __init__(self, model: LanguageModel, device: torch.device, modes: tuple[str, ...] = ("default",)):
        self.mode: str | None = modes[0]
        self.evaluates = device.type != "cpu"
        for block in model.shard_units() or [model]:
            ways = {mode: torch.compile(block.forward, mode=mode) for mode in modes}
            block.forward = functools.partial(self._call, block, block.forward, ways)

    def _call(self, block: torch.nn.Module, eager: Callable[..., Any], ways: dict[str, Callable[..., Any]],
              *args: Any, **kwargs: Any) -> Any:
        way = ways.get(self.mode) if self.mode is not None and (block.training or self.evaluates) else None
        return (way or eager)(*args, **kwargs)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Every block eager inside."""
        mode, self.mode = self.mode, None
        try:
            yield
        finally:
            self.mode = mode
