"""A model compiled block by block, as torchtitan compiles one: each of its `shard_units` (the transformer blocks; the
whole model where it has none) compiled on its own, so every block replays one graph, and under FSDP the hooks that
gather a block's shards run outside it (a model compiled whole breaks into graphs at every such hook). Where the
machine's rule says so (lmlab.core.machine), each block's training forward replays as CUDA graphs: torch.compile's
"reduce-overhead", for a step whose time goes to launching kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmlab.model import LanguageModel

GRAPHS = "reduce-overhead"  # torch.compile's mode that records each compiled block as CUDA graphs and replays them


class CompiledBlocks:
    """The model's blocks compiled in place (their `forward`, which leaves their hooks, names and state dict as they
    were), in training by `mode` (torch.compile's; None: eager). Evaluations (eval mode) run eager on a CPU, where
    compiling the eval-mode graph too costs more than a few batches gain, and compiled without CUDA graphs on a GPU
    (their batches vary)."""

    def __init__(self, model: LanguageModel, device: torch.device, mode: str = "default"):
        self.mode: str | None = mode
        self.evaluates = device.type != "cpu"
        modes = dict.fromkeys((mode, "default") if self.evaluates else (mode,))
        for block in model.shard_units() or [model]:
            ways = {way: torch.compile(block.forward, mode=way) for way in modes}
            block.forward = functools.partial(self._call, block, block.forward, ways)

    def _call(self, block: torch.nn.Module, eager: Callable[..., Any], ways: dict[str, Callable[..., Any]],
              *args: Any, **kwargs: Any) -> Any:
        mode = self.mode if block.training or self.mode is None else "default" if self.evaluates else None
        return (eager if mode is None else ways[mode])(*args, **kwargs)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Every block eager inside."""
        mode, self.mode = self.mode, None
        try:
            yield
        finally:
            self.mode = mode
