"""Rotary position embeddings (Su et al. 2021): each pair of a head's channels (its two halves, as GPT-NeoX pairs them)
turned by its position's angle. On the CPU a turn is written in four passes into its output, and its backward is the
turn back, which needs nothing saved but the angles, where autograd's backward of the formula walks its seven ops
again (`benchmarks/step_profile.py`'s rotary row). Elsewhere, and under torch.compile, which fuses the formula, it is
the formula."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021)."""

    cos: torch.Tensor  # buffers, (block_size, hs/2) each
    sin: torch.Tensor

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        on = torch.get_default_device()  # meta for a shape, whose arithmetic (torch._refs) imports torch._dynamo
        with torch.device("cpu"):
            inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
            angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
        # never saved: checkpoints hold only what training learned
        self.register_buffer("cos", angles.cos().to(on), persistent=False)
        self.register_buffer("sin", angles.sin().to(on), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The angles of (T,) positions, (T, hs/2) each, or of per-row (B, T) positions, (B, 1, T, hs/2) each."""
        cos, sin = self.cos[positions], self.sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, h, T, hs) turned by the angles (cos, sin), each (T, hs/2) or (B, 1, T, hs/2), in x's dtype, contiguous as
    the formula's is (the attention's matmuls read q and k so)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    (x1, x2), (o1, o2) = x.chunk(2, dim=-1), out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _OnCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return turn(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return turn(grad, cos, -sin), None, None  # a rotation's transpose turns it back


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, h, T, hs) by the angles of its positions; the halves of the head are the pairs (GPT-NeoX)."""
    cos, sin = (t.to(x.dtype) for t in rope)  # under autocast q/k are bf16; keep SDPA's inputs one dtype
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _OnCPU.apply(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
