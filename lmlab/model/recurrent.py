"""A recurrent language model, the baseline a transformer is compared with: token embedding, stacked GRU or
LSTM layers that carry a hidden state (the context vector) from token to token, and an output head."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.model.base import LanguageModel
from lmlab.model.loss import next_token_loss


class RecurrentState:
    """What `generate` carries from one step to the next: the hidden state after the tokens seen so far.

    `pos` counts them, so the sampler can restart the window at block_size as it does for the transformer:
    the model was trained on sequences of that length from a zero state, and is kept within that regime.
    """

    def __init__(self, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch, config.n_embd)
        zeros = torch.zeros(shape, device=device)  # the cells run in fp32 (autocast does not cover them on CPU)
        self.hidden: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (
            (zeros, zeros.clone()) if config.rnn_cell == "lstm" else zeros)
        self.pos = 0


class RecurrentLM(LanguageModel):
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

    def embedding_params(self) -> list[nn.Parameter]:
        return [self.wte.weight]

    def lookup_params(self) -> int:
        return 0 if self.config.tie_embeddings else self.wte.weight.numel()

    def hidden_matrices(self) -> list[nn.Parameter]:
        return [p for p in self.rnn.parameters() if p.dim() == 2]

    def shard_units(self) -> list[nn.Module]:
        return []  # nn.GRU/nn.LSTM hold every layer in one module: it is sharded with the root

    def describe(self) -> str:
        c = self.config
        return f"recurrent {c.rnn_cell} {c.n_layer}L/{c.n_embd}" + ("" if c.tie_embeddings else " untied")

    def architecture(self) -> str:
        return self.config.rnn_cell.upper()

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState(self.config, batch, device, dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: RecurrentState | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T), starting from `cache`'s state (and updating it) or zeros."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        x, hidden = self.rnn(x, cache.hidden if cache is not None else None)  # (B, T, C)
        if cache is not None:
            cache.hidden, cache.pos = hidden, cache.pos + idx.size(1)
        logits = self.lm_head(self.drop(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)
        return logits, loss
