"""The models lmlab trains, built from a ModelConfig by `build_model`."""

from __future__ import annotations

from lmlab.config import ModelConfig
from lmlab.model.gpt import GPT
from lmlab.model.recurrent import RecurrentLM

# Both take (idx, targets=None, cache=None) -> (logits, loss), and offer num_params(), lookup_params() and
# new_cache(batch, device, dtype) (what sampling carries from token to token: a KV cache or a hidden state).
LanguageModel = GPT | RecurrentLM


def build_model(config: ModelConfig) -> LanguageModel:
    """The model `config.kind` names, freshly initialised (on the default device)."""
    return RecurrentLM(config) if config.kind == "recurrent" else GPT(config)
