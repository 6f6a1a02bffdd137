"""A model compiled block by block, as torchtitan compiles one: each of its `shard_units` (the transformer blocks; the
whole model where it has none) compiled on its own, so every block replays one graph, and under FSDP the hooks that
gather a block's shards run outside it (a model compiled whole breaks into graphs at every such hook). And the two
choices the machine (lmlab.train.machine) makes of it by timing steps in turns: on a CPU whether compiling pays at all
(the `compile` row), on a GPU whether each block replays as CUDA graphs (the `graphs` row: torch.compile's
"reduce-overhead", for a step whose time goes to launching kernels)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.model import LanguageModel
from lmlab.train.machine import MEASURED

# A compiled step may be no faster than an eager one on a CPU (docs/reference/performance.md), nor one replayed as CUDA
# graphs than one launched kernel by kernel: after the step that compiles (or records) and one of the other way that
# warms up, TRIAL_STEPS of each are timed in turns, and the tried way stays only when its best is at most COMPILE_GAIN
# of the other's best.
TRIAL_STEPS = 3
COMPILE_GAIN = 0.95
GRAPHS = "reduce-overhead"  # torch.compile's mode that records each compiled block as CUDA graphs and replays them

# A trial's row: what its event calls the tried way's best, the other's and the verdict, and what its line says.
TRIALS = {
    "compile": (("compiled_ms", "eager_ms", "compiled"), ("a compiled step", "an eager one"),
                ("compiled", "eager, as compiling does not pay on this CPU",
                 "train.compile = false skips the compile")),
    "graphs": (("graphs_ms", "plain_ms", "graphs"), ("a step replayed as CUDA graphs", "a compiled one without"),
               ("CUDA graphs", "without CUDA graphs, as they do not pay for this step", "")),
}


@dataclass(frozen=True)
class CompileVerdict:
    """What the timed steps of a trial found, and what the run goes on with: on a CPU compiled against eager (`row`
    "compile"), on a GPU compiled with CUDA graphs against without ("graphs")."""

    compiled_ms: float  # the best step of the tried way: compiled, or replayed as CUDA graphs
    eager_ms: float  # the best step of the other: eager, or compiled without CUDA graphs
    compiled: bool  # whether training goes on the tried way
    how: str = MEASURED  # or READ_BACK: timed by an earlier run of this shape on this machine (lmlab.train.machine)
    row: str = "compile"

    def line(self, step: int) -> str:
        _, (tried, other), (goes, not_paying, skip) = TRIALS[self.row]
        timed = (f"step {step}: {tried} took {self.compiled_ms:,.1f} ms, {other} {self.eager_ms:,.1f} ms "
                 f"(the best of {TRIAL_STEPS} each, {self.how})")
        if self.compiled:
            return f"{timed}: training goes on {goes}"
        return (f"{timed}: training goes on {not_paying} (it must be {100 * (1 - COMPILE_GAIN):.0f}% faster"
                f"{'; ' + skip if skip else ''})")

    def record(self, step: int) -> dict[str, Any]:
        """The `compile` or `graphs` event of metrics.jsonl."""
        tried, other, verdict = TRIALS[self.row][0]
        return {"event": self.row, "step": step, tried: round(self.compiled_ms, 3), other: round(self.eager_ms, 3),
                verdict: self.compiled, "how": self.how}

    def kept(self) -> dict[str, Any]:
        """What the machine's cache keeps of it."""
        return {"compiled_ms": self.compiled_ms, "eager_ms": self.eager_ms, "compiled": self.compiled}


class CompileTrial:
    """Steps of the tried way and of the other, timed in turns (a load weighs on both alike). `agree` makes the
    verdict every rank's (rank 0's)."""

    def __init__(self, agree: Callable[[int], int], row: str = "compile"):
        self.agree, self.calls, self.row = agree, 0, row
        self.seconds: dict[bool, list[float]] = {True: [], False: []}

    def compiled_next(self) -> bool:
        return self.calls % 2 == 0

    def timed(self, compiled: bool, seconds: float) -> CompileVerdict | None:
        """A step of the trial done in `seconds`; the verdict after the last one."""
        self.calls += 1
        if self.calls > 2:
            self.seconds[compiled].append(seconds)
        if self.calls < 2 + 2 * TRIAL_STEPS:
            return None
        best, eager = min(self.seconds[True]), min(self.seconds[False])
        keep = bool(self.agree(int(best <= COMPILE_GAIN * eager)))
        return CompileVerdict(1000 * best, 1000 * eager, keep, row=self.row)


def graphs_untried(device: torch.device, compiled: bool, alone: bool) -> str | None:
    """Why no step here replays as CUDA graphs (the machine's line says it), or None where a trial decides."""
    if device.type != "cuda":
        return "not on this device"
    if not compiled:
        return "train.compile"
    # Untried under torchrun: FSDP gathers a block's weights afresh at each step, where a graph replays the addresses
    # it recorded, and DDP's gradient buckets were not tried with graphs.
    return None if alone else "torchrun"


def untried(why: str) -> dict[str, Any]:
    """The `graphs` event of a run whose steps no trial times with and without CUDA graphs: none, and why."""
    return {"event": "graphs", "step": 0, "graphs_ms": None, "plain_ms": None, "graphs": False, "how": why}


class CompiledBlocks:
    """The model's blocks compiled in place (their `forward`, which leaves their hooks, names and state dict as they
    were), each by `mode` at each call: one of `modes` (torch.compile's), or None for eager, so that a trial can time
    them in turns. Evaluations (eval mode) run eager on a CPU, where compiling the eval-mode graph too costs more than
    a few batches gain, and compiled without CUDA graphs on a GPU."""

    def __init__(self, model: LanguageModel, device: torch.device, modes: tuple[str, ...] = ("default",)):
        self.mode: str | None = modes[0]
        self.evaluates = device.type != "cpu"
        for block in model.shard_units() or [model]:
            ways = {mode: torch.compile(block.forward, mode=mode) for mode in modes}
            block.forward = functools.partial(self._call, block, block.forward, ways)

    def _call(self, block: torch.nn.Module, eager: Callable[..., Any], ways: dict[str, Callable[..., Any]],
              *args: Any, **kwargs: Any) -> Any:
        mode = self.mode
        if not block.training:  # an evaluation: never as CUDA graphs (its batches vary), and eager on a CPU
            mode = mode and ("default" if self.evaluates else None)
        way = ways.get(mode) if mode is not None else None
        return (way or eager)(*args, **kwargs)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Every block eager inside."""
        mode, self.mode = self.mode, None
        try:
            yield
        finally:
            self.mode = mode
