"""RMSNorm computed in float32 at least, whatever its input's dtype, and returned in that dtype. On the CPU torch
runs it op by op both ways (its `_fused_rms_norm` is composite there, with no backward of its own): a dozen passes
over the activations, and casts around the bf16 queries and keys. Here the CPU's forward and backward are the closed
forms in the fewest passes eager torch allows (`benchmarks/step_profile.py --torch-norm` weighs the two). Without a
gradient (decoding), elsewhere, and under torch.compile, which fuses the norm itself, it is torch's own."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _OnCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
        xf = wide(x)
        eps = torch.finfo(xf.dtype).eps if eps is None else eps
        # one read of x for its norm, where mean(x²) writes x² out first
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xf, gf = wide(x), wide(grad)
        scaled = gf * weight
        dweight = torch.einsum("...c,...->c", gf * xf, rstd.squeeze(-1)) if ctx.needs_input_grad[1] else None
        # d/dx of x·rstd·w: rstd·g·w − x·rstd³·mean(g·w·x)
        along = rstd.pow(3).mul_(torch.linalg.vecdot(scaled, xf).unsqueeze(-1)).div_(-x.shape[-1])
        return scaled.mul_(rstd).addcmul_(xf, along).to(x.dtype), dweight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over float32 at least (as autocast runs a norm), its output in its input's dtype; `eps` None is the
    machine epsilon of the dtype it computes in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _OnCPU.apply(x, self.weight, self.eps)
        return super().forward(wide(x)).type_as(x)
