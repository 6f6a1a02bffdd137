"""A recurrent context-vector language model, as an lmlab model plugin (kind `context-vector`).

The idea of a WikiText-2 study: beside each token's own representation, one context vector is carried from token
to token, each token blending its contribution into it (a gate decides how much of the old context it keeps), and
the next token is predicted from the token and the context. Layers stack like a transformer's blocks (a residual
stream, pre-LayerNorm), with the recurrence where attention would be:

    g_t = sigmoid(W_g x_t)                          how much of the context token t rewrites   (B, T, K)
    c_t = (1 - g_t) * c_{t-1} + g_t * tanh(W_u x_t)  the context vector after token t           (B, T, K)
    x_t = x_t + W_o c_t;  x_t = x_t + MLP(x_t)

The gates read the token alone, so the recurrence is linear in c and costs one multiply-add per token and channel;
it is run as a loop over the sequence. [model] gives n_layer, n_embd (the token width), block_size (the sequences
it trains on, from a zero context), dropout and tie_embeddings; [model.options] gives:

    context_size  width K of the context vector (default: 4/3 n_embd, which gives a layer the parameters of a
                  GPT block of the same width, so the two compare at equal size)
    mlp_ratio     the MLP's hidden width in multiples of n_embd (default 4)

It keeps no decode state of its own, so lmlab's sampler feeds it its whole window at every token. It declares how it
grows (`growth`: its layers n_layer, its width n_embd), so `--size` and `lmlab scaling --refit` size it as they size a
GPT; the context width follows n_embd unless context_size sets it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError
from lmlab.model import Growth, LanguageModel
from lmlab.model.loss import next_token_loss

DEFAULTS = {"context_size": 0, "mlp_ratio": 4}  # context_size 0: 4/3 n_embd


def read_options(config: ModelConfig) -> dict[str, int]:
    """[model.options], every key known and every value a positive whole number, or one sentence naming it."""
    unknown = sorted(set(config.options) - DEFAULTS.keys())
    if unknown:
        raise UserError(f"model.options.{unknown[0]} is not a setting of the context-vector model; it takes "
                        f"{', '.join(DEFAULTS)}.")
    options = {**DEFAULTS, **config.options}
    for name, value in options.items():
        if type(value) is not int or not 0 <= value <= 1 << 20 or (value == 0 and name != "context_size"):
            raise UserError(f"model.options.{name} is {value!r}; it must be a whole number from 1 to 2**20"
                            f"{' (or 0 for 4/3 n_embd)' if name == 'context_size' else ''}.")
    options["context_size"] = options["context_size"] or round(4 * config.n_embd / 3)
    return options


class ContextLayer(nn.Module):
    def __init__(self, width: int, context: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.write = nn.Linear(width, 2 * context)  # gate and candidate, from the token alone
        self.read = nn.Linear(context, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, candidate = self.write(self.ln_1(x)).float().chunk(2, dim=-1)  # (B, T, K) each, the scan in fp32
        keep, add = 1 - torch.sigmoid(gate), torch.sigmoid(gate) * torch.tanh(candidate)
        c = torch.zeros_like(add[:, 0])  # (B, K): every sequence starts from an empty context
        contexts = []
        for t in range(x.size(1)):
            c = keep[:, t] * c + add[:, t]
            contexts.append(c)
        context = torch.stack(contexts, dim=1).type_as(x)  # (B, T, K)
        x = x + self.dropout(self.read(context))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class ContextVectorLM(LanguageModel):
    growth = Growth(depth="n_layer", width="n_embd")  # depth d: d layers of d x the preset's n_embd per layer

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        options = read_options(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([ContextLayer(config.n_embd, options["context_size"], options["mlp_ratio"],
                                                  config.dropout) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.wte.weight = self.lm_head.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def describe(self) -> str:
        options = read_options(self.config)
        return (f"context-vector {self.config.n_layer}L/{self.config.n_embd} context {options['context_size']}"
                + ("" if self.config.tie_embeddings else " untied"))

    def architecture(self) -> str:
        return "context vector"

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for ids (B, T), and the mean next-token loss when targets are given."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)  # lmlab's: fp32, padding and fine-tuning prompts skipped
        return logits, loss
