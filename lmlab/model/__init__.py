"""The models lmlab trains, built from a ModelConfig by `build_model`; each implements `LanguageModel`."""

from __future__ import annotations

from lmlab.config import ModelConfig
from lmlab.model.base import LanguageModel
from lmlab.model.gpt import GPT
from lmlab.model.recurrent import RecurrentLM

__all__ = ["LanguageModel", "build_model"]


def build_model(config: ModelConfig) -> LanguageModel:
    """The model `config.kind` names, freshly initialised (on the default device)."""
    return RecurrentLM(config) if config.kind == "recurrent" else GPT(config)
