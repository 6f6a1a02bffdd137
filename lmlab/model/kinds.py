"""The model kinds `model.kind` names (`KINDS`: lmlab's own, by name) and `construct`, which builds any of them or a
kind an installed package registers (lmlab.model.plugins). core/plugin_kinds.py's BUILT_IN_KINDS and core/config.py's
KIND_FIELDS say which names and settings the config takes; tests/test_model.py holds the two in step."""

from __future__ import annotations

from lmlab.core.config import ModelConfig
from lmlab.model.base import LanguageModel
from lmlab.model.gpt import GPT
from lmlab.model.plugins import build_plugin
from lmlab.model.recurrent import RecurrentLM

KINDS: dict[str, type[LanguageModel]] = {"gpt": GPT, "recurrent": RecurrentLM}


def construct(config: ModelConfig) -> LanguageModel:
    """The model `config.kind` names, built on the default device as it stands."""
    kind = KINDS.get(config.kind)
    return kind(config) if kind is not None else build_plugin(config)
