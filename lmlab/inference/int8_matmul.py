"""The matmul of rows of activations by int8 weights with a scale per output channel (lmlab.inference.int8), by how
many rows there are. PyTorch's weight-only int8 kernel pays a pass over the weights for each row: right for a decode
step's few rows (and the one Inductor's int8 GEMM template compiles), slow for a prompt's hundreds, read eagerly in one
pass. From DENSE_ROWS rows the weights convert once to a dense dtype and multiply as one matmul, bound by arithmetic
instead; benchmarks/int8_rows.py times both, row count by row count, in each dtype."""

from __future__ import annotations

import torch

from lmlab.core import peak

DENSE_ROWS = 32  # from here the dense matmul was the faster on 5 of the 6 hosts and shapes benchmarks/int8_rows.py ran


def int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`rows` (n, in) times `weight` (out, in) int8 scaled by `scales` (out,) bfloat16: bfloat16 (n, out) from the
    kernel, from activations read as bfloat16 (its only vectorized case on AVX2 and AVX-512); from DENSE_ROWS rows,
    eagerly, `dense_matmul` in `dense_dtype`."""
    if torch.compiler.is_compiling() or len(rows) < DENSE_ROWS:  # compiled: a decode step's rows
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16), weight, scales)
    return dense_matmul(rows, weight, scales, dense_dtype())


def dense_matmul(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`rows` times the weights scaled into `dtype`, each rounded once, as the kernel rounds its product: converted
    exactly, then scaled in place (an op over int8 and a float runs a scalar loop, up to 7 times slower)."""
    return torch.nn.functional.linear(rows.to(dtype), weight.to(dtype).mul_(scales.to(dtype)[:, None]))


def dense_dtype() -> torch.dtype:
    """bfloat16 where this CPU multiplies it natively (`lmlab.core.peak.cpu_native`), else float32: without a native
    kernel a bfloat16 matmul is emulated, slower than float32's."""
    return torch.bfloat16 if peak.cpu_native(torch.bfloat16) else torch.float32
