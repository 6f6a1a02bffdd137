"""A decoder-only transformer: GPT-2 by default, with the post-GPT-2 changes (rotary, RMSNorm, SwiGLU, QK-norm, GQA,
fewer biases, an untied head) behind config flags."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.core.config import ModelConfig
from lmlab.model.attention import PATHS, attend, attend_written_out
from lmlab.model.base import HeadOverStates
from lmlab.model.kvcache import KVCache
from lmlab.model.rmsnorm import RMSNorm
from lmlab.model.rotary import Rotary, apply_rotary


def padded_vocab(vocab_size: int) -> int:
    """Large vocabularies padded to a multiple of 64 so the head matmul tiles evenly; the extra logits are cut off
    (masked, in a training step's loss: lmlab.model.loss.head_loss)."""
    return math.ceil(vocab_size / 64) * 64 if vocab_size > 1024 else vocab_size


def swiglu_hidden(n_embd: int) -> int:
    """8/3 of the width (a multiple of 8): SwiGLU's three matrices cost what GPT-2's 4x MLP's two do."""
    return math.ceil(8 * n_embd / 3 / 8) * 8


def mlp_width(config: ModelConfig) -> int:
    return config.mlp_hidden or (swiglu_hidden(config.n_embd) if config.mlp == "swiglu" else 4 * config.n_embd)


def rms_norm(config: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=config.norm_eps or None)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return rms_norm(config, dim)
    return nn.LayerNorm(dim, eps=config.norm_eps or 1e-5, bias=config.has_bias("norm"))


def matmul(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` over states (B, T, C) as one matmul of (B*T, C), reshaped here: what nn.Linear computes for (B, T, C),
    bit for bit (one addmm over the rows), except that the layer returns a tensor of its own, where for (B, T, C) and
    a bias it returns a view of one. Under bf16, FSDP all-gathers these layers as modules of their own (fsdp.shard),
    and an in-place op on a view such a module returns would drop FSDP's pre-backward hook."""
    return layer(x.flatten(0, 1)).view(*x.shape[:2], -1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_size = config.head_size
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size,
                                bias=config.has_bias("qkv"))
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.has_bias("proj"))
        self.q_norm = rms_norm(config, self.head_size) if config.qk_norm else None
        self.k_norm = rms_norm(config, self.head_size) if config.qk_norm else None
        self.dropout = config.dropout
        self.path = "fused"  # how attention runs where no cache is in view (GPT.use_attention)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.size()
        hs, kv = self.head_size, self.n_kv_head
        qkv = matmul(self.c_attn, x).split([self.n_head * hs, kv * hs, kv * hs], dim=2)
        q, k, v = (t.view(B, T, -1, hs).transpose(1, 2) for t in qkv)  # (B, nh or nkv, T, hs)
        if self.q_norm is not None and self.k_norm is not None:  # bounds the attention logits, which can spike the loss
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is None:
            y = attend(q, k, v, self.path, self.dropout if self.training else 0.0)
        elif cache.fresh:
            cache.update(self.layer, k, v)  # the prompt sees only itself: causal, no mask
            y = attend(q, k, v, "fused")
        else:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, L, hs): the positions in view
            y = attend_written_out(q, k, v, cache.mask) if T == 1 else F.scaled_dot_product_attention(
                q, k, v, attn_mask=cache.mask, enable_gqa=kv != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)
        return self.resid_dropout(matmul(self.c_proj, y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = mlp_width(config)
        # SwiGLU's gate and value fused into one matmul
        fc = 2 * hidden if self.kind == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc, bias=config.has_bias("mlp"))
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.has_bias("mlp"))
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approx = config.gelu_approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = matmul(self.c_fc, x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approx)
        return self.dropout(matmul(self.c_proj, h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(HeadOverStates):
    graphs = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size comes from the dataset and must be set before building"
        self.config = config
        padded = padded_vocab(config.vocab_size)
        learned = config.pos_emb == "learned"
        wte = nn.Embedding(padded, config.n_embd)
        # Any: torch's stubs type its parts as `Tensor | Module`
        self.transformer: Any = nn.ModuleDict(dict(
            wte=wte,
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        # zeroed below: training starts from the token embedding alone
        pairs = min(config.bigram_buckets, config.vocab_size ** 2)  # a row more than the pairs is never read
        self.bigram = nn.Embedding(pairs, config.n_embd) if pairs else None
        self.rotary = None if learned else Rotary(config.head_size, config.block_size, config.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, padded, bias=False)
        if config.tie_embeddings:
            wte.weight = self.lm_head.weight
        for module in self.modules():  # the leaves in the order `apply` visits them, so the same draws
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.weight)
        # GPT-2: each block adds two residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def hidden_matrices(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.h.parameters() if p.dim() == 2]

    def padding_params(self, embeddings: bool = True) -> int:
        rows = (padded_vocab(self.config.vocab_size) - self.config.vocab_size) * self.config.n_embd
        tables = 1 if self.config.tie_embeddings else 2  # the token table, and a head of its own
        return rows * (tables if embeddings else tables - 1)

    def shard_units(self) -> list[nn.Module]:
        return list(self.transformer.h)

    def attention_flops(self) -> float:
        c = self.config
        return 12.0 * c.n_layer * c.n_head * c.head_size * c.block_size  # PaLM's 12·L·H·Q·T

    def describe(self) -> str:
        c = self.config
        options = [c.pos_emb if c.pos_emb != "learned" else "", c.norm if c.norm != "layernorm" else "",
                   c.mlp if c.mlp != "gelu" else "", "qk-norm" if c.qk_norm else "",
                   ("" if c.bias is True else "qkv-bias" if c.bias == "qkv" else f"bias({c.bias})" if c.bias
                    else "no-bias"),
                   "" if c.tie_embeddings else "untied", f"gqa{c.kv_heads}" if c.kv_heads != c.n_head else "",
                   f"bigram{self.bigram.num_embeddings}" if self.bigram is not None else ""]
        return " ".join([f"gpt {c.n_layer}L/{c.n_embd}", *filter(None, options)])

    def architecture(self) -> str:
        """GPT-2, modern (rotary, RMSNorm and SwiGLU, as in Llama) or mixed (some of the three)."""
        c = self.config
        modern = (c.pos_emb == "rope", c.norm == "rmsnorm", c.mlp == "swiglu")
        return "modern" if all(modern) else "mixed" if any(modern) else "GPT-2"

    def use_attention(self, path: str) -> bool:
        assert path in PATHS, path
        for block in self.transformer.h:
            block.attn.path = path
        return True

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.config, batch, device, dtype)

    def pairs(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The bigram table's rows (B, T, C) for token ids (B, T) at `positions`, each pairing a token with the one
        before it: within `idx`, or the last one the cache was fed. Position 0 has none and gets zeros, in training
        (a window's first token) as in decoding (a prompt's, or a refilled context's)."""
        table = self.bigram
        assert table is not None, "pairs are looked up only in a model with a bigram table"
        before = torch.zeros_like(idx[:, :1]) if cache is None else cache.last[:, None]
        previous = torch.cat([before, idx[:, :-1]], dim=1)
        if cache is not None:
            cache.last.copy_(idx[:, -1])
        rows = table((previous * self.config.vocab_size + idx) % table.num_embeddings).float()
        return rows * (positions > 0).unsqueeze(-1)  # positions (T,) or (B, T)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normed states (B, T, C) the head reads, for token ids (B, T)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size"
        positions = torch.arange(T, device=idx.device) if cache is None else cache.advance(T)
        # the residual stream in fp32, as autocast keeps it, also when decoding holds the table in bf16
        x = self.transformer.wte(idx).float()  # (B, T, C)
        if self.bigram is not None:
            x = x + self.pairs(idx, positions, cache)
        rope = self.rotary(positions) if self.rotary is not None else None
        if rope is None:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        return self.transformer.ln_f(x)
