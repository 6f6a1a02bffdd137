"""The models lmlab trains, built from a ModelConfig by `build_model`: its own kinds (`kinds.KINDS`: gpt,
recurrent) and the kinds installed packages register (`plugins`); each implements `LanguageModel`."""

from __future__ import annotations

import torch

from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError
from lmlab.core.fileio import host_memory, human_bytes
from lmlab.core.growth import Growth
from lmlab.model.base import LanguageModel
from lmlab.model.gpt import GPT
from lmlab.model.kinds import construct
from lmlab.model.memory import UNCOUNTABLE, model_bytes, on_meta
from lmlab.model.recurrent import RecurrentLM

__all__ = ["GPT", "Growth", "LanguageModel", "RecurrentLM", "build_model", "model_bytes"]


def build_model(config: ModelConfig) -> LanguageModel:
    """The model `config.kind` names, freshly initialised (on the default device). Weights that would not fit in
    this machine's memory are refused in one sentence before anything is allocated (every model is built on the
    CPU first); on the meta device, which allocates nothing, any size is built, uninitialised (a shape)."""
    if torch.get_default_device().type == "meta":
        return on_meta(config)
    if config.vocab_size > 0:
        need, have = model_bytes(config), host_memory()
        if need > have:
            figure = "more memory than can be counted" if need >= UNCOUNTABLE else human_bytes(need)
            pairs = f", bigram_buckets {config.bigram_buckets}" if config.bigram_buckets else ""
            raise UserError(f"a model with n_layer {config.n_layer}, n_embd {config.n_embd}, block_size "
                            f"{config.block_size}{pairs} and vocab_size {config.vocab_size} needs {figure} for "
                            f"its weights alone, but this machine has {human_bytes(have)} of memory available; "
                            "make it smaller.")
    return construct(config)
