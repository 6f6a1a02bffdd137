"""The way attention trains (`train.attention`, lmlab.model.attention's paths): as set, or with `auto` the faster of
this device's candidates at the run's own shape and dtype, timed before the first step. On a CPU, fused or math:
neither is faster everywhere (on an AVX-512 BF16 CPU the fused kernel's bf16 backward is several times the math
path's at a context of 128 and faster at 1,024: benchmarks/attention_paths.py), and the math path keeps every T x T
score for the backward, so it is a candidate only where a step with them fits in memory. On CUDA, torch's pick (flash
where it applies) or cuDNN's kernel, which some GPUs and shapes run faster and others refuse (a dtype, a head size, a
cuDNN too old): a candidate that raises is not taken."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.device import synchronize
from lmlab.core.errors import UserError
from lmlab.core.fileio import host_memory, human_bytes
from lmlab.model import LanguageModel
from lmlab.model.attention import CUDA_ONLY, PATHS, attend, score_bytes
from lmlab.model.memory import Need, StateBytes, training_need

if TYPE_CHECKING:
    from lmlab.train.machine import Machine

# The paths are timed in turns (a load weighs on both alike), ROUNDS times each after one untimed call, and the
# best of each compared. Another path than fused is taken only where its best is at most GAIN of fused's: near a
# tie, torch's own kernel (on a CPU, the one that keeps no scores), and a choice that a busy moment does not flip.
ROUNDS = 5
GAIN = 0.9
CANDIDATES = {"cpu": ("fused", "math"), "cuda": ("fused", "cudnn")}  # fused first: the default, the others its rivals

Timer = Callable[[str], float]  # seconds of one forward and backward of a layer's attention by a path


@dataclass(frozen=True)
class AttentionChoice:
    """The path training runs attention by, why, and the timings (ms per layer, forward and backward) behind it."""

    path: str
    why: str
    ms: dict[str, float] = field(default_factory=dict)
    how: str | None = None  # whether `ms` were measured now or read back (lmlab.train.machine)

    def line(self) -> str:
        return f"attention: {self.path}; {self.why}"

    def record(self, step: int) -> dict[str, Any]:
        """The `attention` event of metrics.jsonl."""
        return {"event": "attention", "step": step, "path": self.path, "how": self.how,
                **{f"{path}_ms": round(ms, 3) for path, ms in self.ms.items()}}


def layer_timer(config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> Timer:
    """One layer's attention at `config`'s shape over `batch` sequences in `dtype`, forward and backward, timed."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(heads: int) -> torch.Tensor:
        shape = (batch, heads, config.block_size, config.head_size)
        return torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()

    q, k, v = rand(config.n_head), rand(config.kv_heads), rand(config.kv_heads)

    def run(path: str) -> float:
        began = time.perf_counter()
        attend(q, k, v, path, config.dropout).sum().backward()
        synchronize(device)
        return time.perf_counter() - began

    return run


def math_need(config: ModelConfig, state_bytes: StateBytes, dtype: torch.dtype) -> Need:
    """A training step per sequence on the math path: the fused one's need, every layer's kept scores, and the two
    score-sized tensors one layer's backward holds beside them at once (the gradients of its softmax's output and
    input; the forward's scores before the softmax are one of them, gone before the backward)."""
    need = training_need(config, state_bytes)
    kept = config.n_layer * score_bytes(dtype, config.dropout > 0) + 2 * torch.empty((), dtype=dtype).element_size()
    return Need(need.fixed, need.each + config.n_head * config.block_size ** 2 * kept)


def choose_attention(model: LanguageModel, cfg: TrainConfig, machine: Machine, state_bytes: StateBytes,
                     processes: int = 1, timer: Timer | None = None, agree: Callable[[int], int] | None = None,
                     setting: str = "train.attention") -> AttentionChoice | None:
    """Set `model`'s attention path and say which and why (`machine`'s row: its timing read back when this shape was
    timed before); None where its kind has none to choose. `processes` share this host's memory; `agree` makes rank
    0's choice every rank's; `timer` times a path (default: the model's own shape, `layer_timer`); `setting` is what
    the user set `cfg.attention` by."""
    if not model.use_attention("fused"):
        return None
    if cfg.attention in CUDA_ONLY and machine.device.type != "cuda":
        raise UserError(f"{setting} = \"{cfg.attention}\" is a kernel of CUDA's, and this run trains on "
                        f"{machine.device.type}; set it to auto, fused or math.")
    if cfg.attention != "auto":
        model.use_attention(cfg.attention)
        machine.said("attention", f"attention {cfg.attention}", setting)
        return AttentionChoice(cfg.attention, setting)
    choice = _auto(model.config, cfg, machine, state_bytes, processes, timer)
    if agree is not None:
        path = PATHS[agree(PATHS.index(choice.path))]
        choice = choice if path == choice.path else AttentionChoice(path, "auto: the first process's")
    model.use_attention(choice.path)
    machine.said("attention", f"attention {choice.path}", choice.how or "auto")
    return choice


def _auto(config: ModelConfig, cfg: TrainConfig, machine: Machine, state_bytes: StateBytes, processes: int,
          timer: Timer | None) -> AttentionChoice:
    device, dtype = machine.device, machine.dtype
    candidates = CANDIDATES.get(device.type, ("fused",))
    if len(candidates) == 1:
        return AttentionChoice("fused", f"auto: torch's fused kernels on {device.type}")
    if "math" in candidates:
        need, have = math_need(config, state_bytes, dtype).at(cfg.batch_size), host_memory() // processes
        if need > have:
            return AttentionChoice("fused", f"auto: the math path's step would need {human_bytes(need)} with its "
                                            f"scores, more than the {human_bytes(have)} available")
    shape = {"model": dataclasses.asdict(config), "batch": cfg.batch_size, "dtype": str(dtype),
             "threads": torch.get_num_threads()}
    value, how = machine.decide("attention", shape, lambda: {"ms": _timed(timer or layer_timer(
        config, cfg.batch_size, device, dtype), candidates)})
    assert value is not None, "the paths are always timed"
    ms = {path: float(value["ms"][path]) for path in candidates if path in value["ms"]}
    rival = min((path for path in ms if path != "fused"), key=ms.__getitem__, default="fused")
    path = rival if ms[rival] <= GAIN * ms["fused"] else "fused"
    timings = ", ".join(f"{ms[p]:,.2f} ms {p}" for p in candidates if p in ms)
    refused = [p for p in candidates if p not in ms]
    return AttentionChoice(path, f"auto: a layer's forward and backward took {timings}"
                                 f"{''.join(f', {p} refused' for p in refused)} ({how})", ms, how)


def _timed(timer: Timer, candidates: tuple[str, ...]) -> dict[str, float]:
    """The best ms of each candidate, timed in turns after an untimed call of each; a CUDA kernel that refuses this
    shape, dtype or GPU (a RuntimeError: no kernel available) is left out."""
    seconds: dict[str, list[float]] = {}  # of the candidates that work
    for path in candidates:
        try:
            timer(path)  # allocations, caches: untimed
        except RuntimeError:
            if path not in CUDA_ONLY:
                raise
            continue
        seconds[path] = []
    for _ in range(ROUNDS):
        for path, times in seconds.items():
            times.append(timer(path))
    return {path: 1000 * min(times) for path, times in seconds.items()}
