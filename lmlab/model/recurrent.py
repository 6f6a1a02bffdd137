"""A recurrent language model, the baseline a transformer is compared with: token embedding, stacked GRU or
LSTM layers that carry a hidden state (the context vector) from token to token, and an output head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from lmlab.core.config import ModelConfig
from lmlab.model.base import DecodeState, HeadOverStates


class RecurrentState(DecodeState):
    """The hidden state of each row after the tokens it has seen (h, and c for an LSTM), kept row-first and
    handed to the cells as (layers, rows, width). `pos` counts the tokens, so the sampler restarts the window at
    block_size as it does for the transformer: the model was trained on sequences of that length from a zero
    state, and is kept within that regime."""

    def __init__(self, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        # fp32 whatever the dtype: the cells run in fp32 (autocast does not cover them on CPU)
        count = 2 if config.rnn_cell == "lstm" else 1
        self.hidden = [torch.zeros(batch, config.n_layer, config.n_embd, device=device) for _ in range(count)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.pos, *self.hidden]

    @classmethod
    def over(cls, tensors: Sequence[torch.Tensor]) -> RecurrentState:
        state = object.__new__(cls)
        state.pos, state.hidden = tensors[0], list(tensors[1:])
        return state

    def state(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The hidden state as nn.GRU (one tensor) or nn.LSTM (h and c) takes it: (layers, rows, width)."""
        layers_first = [h.transpose(0, 1).contiguous() for h in self.hidden]
        return layers_first[0] if len(layers_first) == 1 else (layers_first[0], layers_first[1])

    def store(self, hidden: torch.Tensor | tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        """Keep the state after `length` more tokens, in place, so that a view of some rows writes through."""
        for mine, new in zip(self.hidden, hidden if isinstance(hidden, tuple) else (hidden,)):
            mine.copy_(new.transpose(0, 1))
        self.pos += length


class RecurrentLM(HeadOverStates):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size comes from the dataset and must be set before building"
        self.config = config
        cell = nn.LSTM if config.rnn_cell == "lstm" else nn.GRU
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # nn.GRU/nn.LSTM apply their own dropout between layers (not after the last one: self.drop does that).
        self.rnn = cell(config.n_embd, config.n_embd, num_layers=config.n_layer, batch_first=True,
                        dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        if config.tie_embeddings:
            self.wte.weight = self.lm_head.weight

    # Its embedding and lookup tables are LanguageModel's defaults' (the one nn.Embedding, looked up only when untied),
    # and so are its shard units (none: nn.GRU/nn.LSTM hold every layer in one module, sharded with the root).
    def hidden_matrices(self) -> list[nn.Parameter]:
        return [p for p in self.rnn.parameters() if p.dim() == 2]

    def describe(self) -> str:
        c = self.config
        return f"recurrent {c.rnn_cell} {c.n_layer}L/{c.n_embd}" + ("" if c.tie_embeddings else " untied")

    def architecture(self) -> str:
        return self.config.rnn_cell.upper()

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState(self.config, batch, device, dtype)

    def hidden(self, idx: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        """The states (B, T, C) the head reads, for token ids (B, T), from `cache`'s state (updated) or zeros."""
        x = self.drop(self.wte(idx).float())  # (B, T, C), fp32 also from a table held in bf16 (decode.hold_weights)
        x, hidden = self.rnn(x, cache.state() if cache is not None else None)  # (B, T, C)
        if cache is not None:
            cache.store(hidden, idx.size(1))
        return self.drop(x)
