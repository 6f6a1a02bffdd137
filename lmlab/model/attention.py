"""The ways a transformer's attention runs: `fused`, torch's scaled_dot_product_attention (a flash kernel that
keeps no T x T scores, the one torch picks); `math`, the scores written out as a masked matmul, a softmax and a
matmul, which keeps the softmax for the backward; and on CUDA `cudnn`, the same call held to cuDNN's fused kernel.
Which is faster depends on the device, dtype and shape (benchmarks/attention_paths.py), so training times them
(lmlab.train.attention); decoding one token over a cache always writes it out (`attend_written_out`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PATHS = ("fused", "math", "cudnn")
CUDA_ONLY = ("cudnn",)  # paths of kernels only CUDA has


def attend_written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of queries (B, nh, T, hs) over keys and values (B, nkv, L, hs), each query seeing the keys `mask`
    (B or 1, 1, T, L) allows (decoding: no dropout).

    Each group of nh / nkv query heads attends to its shared key/value head as nh / nkv times T queries of that head,
    so every matmul is a plain batched one over (B, nkv) and the keys are read where they lie: broadcasting a group
    dimension instead makes matmul copy them nh / nkv times (benchmarks/gqa_decode.py). Compiled, these few ops fuse
    into a decode step's own kernels, where an SDPA call costs more than the whole attention at one query
    (benchmarks/decode_speed.py)."""
    B, nh, T, hs = q.shape
    nkv = k.size(1)
    # q folded to (B, nkv, g*T, hs): group g's T queries at g*T .. g*T + T-1
    scores = q.reshape(B, nkv, nh // nkv * T, hs) @ k.transpose(-2, -1) * hs ** -0.5  # (B, nkv, g*T, L)
    # Unfolded to mask: each group's T queries get the same T rows of the mask. The softmax in fp32, as autocast
    # runs it.
    scores = scores.float().view(B, nkv, nh // nkv, T, -1).masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).type_as(v).view(B, nkv, nh // nkv * T, -1)  # (B, nkv, g*T, L)
    return (weights @ v).view(B, nh, T, hs)  # (B, nkv, g*T, hs) -> (B, nh, T, hs)


def attend_causal_written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
                              ) -> torch.Tensor:
    """Causal attention of queries (B, nh, T, hs) over keys and values (B, nkv, T, hs), the scores written out in the
    inputs' dtype: the scale and the causal mask ride on the scores' matmul (an additive -inf above the diagonal)
    and the softmax, which computes in fp32 whatever its dtype, writes the weights the next matmul reads. Casting
    the scores to fp32 and back and masking them apart each cost a pass more over the T x T scores, which in bf16
    took more time than the matmuls themselves (benchmarks/attention_paths.py). Query groups fold onto their
    key/value head as in `attend_written_out`."""
    B, nh, T, hs = q.shape
    nkv = k.size(1)
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(nh // nkv, 1)
    scores = torch.baddbmm(mask, q.reshape(B * nkv, nh // nkv * T, hs), k.reshape(B * nkv, T, hs).transpose(1, 2),
                           alpha=hs ** -0.5)  # (B*nkv, g*T, T)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return (weights @ v.reshape(B * nkv, T, hs)).view(B, nh, T, hs)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of (B, nh, T, hs) queries over (B, nkv, T, hs) keys and values by `path`."""
    if path == "math":
        return attend_causal_written_out(q, k, v, dropout_p)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if path == "cudnn" else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=k.size(1) != q.size(1))


def score_bytes(dtype: torch.dtype, dropout: bool) -> int:
    """Bytes the math path keeps for the backward per score: the softmax and, with dropout, its mask and the weights
    it leaves, each in `dtype` (tests/test_attention.py traces them)."""
    return torch.empty((), dtype=dtype).element_size() * (3 if dropout else 1)
