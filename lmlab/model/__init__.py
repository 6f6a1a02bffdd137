"""The models lmlab trains, built from a ModelConfig by `build_model`: its own kinds (gpt, recurrent) and the kinds
installed packages register (`plugins`); each implements `LanguageModel`."""

from __future__ import annotations

import dataclasses

import torch

from lmlab.config import ModelConfig
from lmlab.errors import UserError
from lmlab.fileio import host_memory, human_bytes
from lmlab.model.base import LanguageModel
from lmlab.model.gpt import GPT
from lmlab.model.plugins import build_plugin
from lmlab.model.recurrent import RecurrentLM

__all__ = ["LanguageModel", "build_model", "model_bytes"]


def _construct(config: ModelConfig) -> LanguageModel:
    if config.kind == "gpt":
        return GPT(config)
    return RecurrentLM(config) if config.kind == "recurrent" else build_plugin(config)


def model_bytes(config: ModelConfig) -> int:
    """Bytes of the weights and buffers a model of `config` holds, counted on the meta device (nothing is
    allocated) from models of one and two layers, every layer being the same size: so a config asking for
    10^12 positions or layers is sized at once."""
    sizes = []
    with torch.device("meta"):
        for n_layer in (1, 2):
            model = _construct(dataclasses.replace(config, n_layer=n_layer))
            sizes.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    return sizes[0] + (config.n_layer - 1) * (sizes[1] - sizes[0])


def build_model(config: ModelConfig) -> LanguageModel:
    """The model `config.kind` names, freshly initialised (on the default device). Weights that would not fit in
    this machine's memory are refused in one sentence before anything is allocated (every model is built on the
    CPU first); on the meta device, which allocates nothing, any size is built."""
    if torch.get_default_device().type != "meta" and config.vocab_size > 0:
        need, have = model_bytes(config), host_memory()
        if need > have:
            raise UserError(f"a model with n_layer {config.n_layer}, n_embd {config.n_embd}, block_size "
                            f"{config.block_size} and vocab_size {config.vocab_size} needs {human_bytes(need)} for "
                            f"its weights alone, but this machine has {human_bytes(have)} of memory available; "
                            "make it smaller.")
    return _construct(config)
