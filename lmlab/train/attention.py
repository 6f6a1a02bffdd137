"""The way attention trains (`train.attention`, lmlab.model.attention's paths): as set, or with `auto` by the
machine's rule (lmlab.core.machine): on a CPU in bfloat16 at a short context the math path, which keeps every T x T
score for the backward and so is taken only where a step with them fits in memory; else torch's fused kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.errors import UserError
from lmlab.core.fileio import host_memory
from lmlab.core.machine import Machine
from lmlab.model import LanguageModel
from lmlab.model.attention import CUDA_ONLY, PATHS, score_bytes
from lmlab.model.memory import Need, StateBytes, training_need


def math_need(config: ModelConfig, state_bytes: StateBytes, dtype: torch.dtype) -> Need:
    """A training step per sequence on the math path: the fused one's need, every layer's kept scores, and the two
    score-sized tensors one layer's backward holds beside them at once (the gradients of its softmax's output and
    input; the forward's scores before the softmax are one of them, gone before the backward)."""
    need = training_need(config, state_bytes)
    kept = config.n_layer * score_bytes(dtype, config.dropout > 0) + 2 * torch.empty((), dtype=dtype).element_size()
    return Need(need.fixed, need.each + config.n_head * config.block_size ** 2 * kept)


def choose_attention(model: LanguageModel, cfg: TrainConfig, machine: Machine, state_bytes: StateBytes,
                     processes: int = 1, agree: Callable[[int], int] | None = None,
                     setting: str = "train.attention") -> str | None:
    """Set `model`'s attention path by `machine`'s rule (`cfg.attention`, set by `setting`) and return it; None where
    its kind has none to choose. `processes` share this host's memory; `agree` makes rank 0's path every rank's."""
    if not model.use_attention("fused"):
        return None
    if cfg.attention in CUDA_ONLY and machine.device.type != "cuda":
        raise UserError(f"{setting} = \"{cfg.attention}\" is a kernel of CUDA's, and this run trains on "
                        f"{machine.device.type}; set it to auto, fused or math.")
    fits = math_need(model.config, state_bytes, machine.dtype).at(cfg.batch_size) <= host_memory() // processes
    path = machine.attention(cfg.attention, setting, model.config.block_size, fits)
    if agree is not None:
        path = PATHS[agree(PATHS.index(path))]
    model.use_attention(path)
    return path
