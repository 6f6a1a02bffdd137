"""A matmul from int8 weights (`--quantize int8`, lmlab.inference.quantize): the module that takes an nn.Linear's
place."""

from __future__ import annotations

import torch

from lmlab.inference.int8_matmul import int8_matmul


class Int8Linear(torch.nn.Module):
    """`linear`'s weights as int8 with a bfloat16 scale per output channel (a row's largest weight maps to 127), applied
    by `int8_matmul`: PyTorch's weight-only int8 kernel (`torch._weight_int8pack_mm`, gpt-fast's int8 path) at a
    decode step's few rows and in a compiled step, a dense matmul at an eager prompt's many. The bias stays float32."""

    weight: torch.Tensor  # buffers: (out, in) int8 and (out,) bfloat16
    scales: torch.Tensor

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # the scale rounded to bfloat16 first, so the rows are rounded against the scale the kernel applies
        scales = (weight.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127).to(torch.bfloat16)
        self.register_buffer("weight", (weight / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features), self.weight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias
