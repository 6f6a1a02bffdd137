"""Decoding from 8-bit weights on the CPU (`--quantize int8`). At a few rows a decode step is bound by reading its
weights, and int8 reads a quarter of float32's bytes: every matmul's weights, the head's too, are held as int8 with a
scale per output channel, read by PyTorch's weight-only int8 kernel at a step's few rows (a prompt's many convert them
for one dense matmul: lmlab.inference.int8_matmul). The token table stays float32: a step reads one row of it. A matmul
whose inputs the kernel cannot read (`readable`) keeps float32 weights. Past the weights, a step reads every cached key
and value: as float32, 19 MB at position 256 and 66 MB at 900 in GPT-2 small's shape, beside 124 MB of int8 weights.
int8 decoding caches them as bfloat16 (`state_dtype`), attention still computed in float32 from them as read (compiled,
the conversion fuses into the kernels that load them). AOTInductor compiles such a model as it compiles a float32 one
(every matmul through Inductor's own C++ int8 GEMM template), and it pays most here: compiled, a step is one call into
C++ (with --compile; eagerly, PyTorch's kernel is slower than the fbgemm one that dynamic quantization used, which
nothing compiles). benchmarks/llama_cpp_side_by_side.py times it beside the compiled float32 step and llama.cpp's q8_0.
No torch at the top: the commands read QUANTIZE as they parse."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmlab.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from lmlab.model import LanguageModel

QUANTIZE = ("none", "int8")  # the choices of --quantize
# What int8 costs, as tests/test_quantize.py holds it to on trained models: each step's logits within this share of
# their spread (standard deviation) of float32's, so greedy text parts from float32's only after a near tie.
LOGIT_TOLERANCE = 0.15


def tolerance(how: str) -> str:
    """What decoding from weights held as `how` (one of QUANTIZE but none) is and costs, said beside its name."""
    assert how == "int8", how
    return (f"a scale per output channel, activations read as bfloat16 by PyTorch's weight-only int8 kernel; logits "
            f"within {LOGIT_TOLERANCE:.0%} of their spread of float32's, greedy text the same but after a near tie; "
            "keys and values cached as bfloat16")


def held_as(model: LanguageModel) -> str:
    """The format (one of QUANTIZE) `model`'s matmul weights are held in."""
    from lmlab.inference.int8 import Int8Linear

    return "int8" if any(isinstance(module, Int8Linear) for module in model.modules()) else "none"


def state_dtype(how: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model whose weights are held as `how` keeps its decode state (a KV cache) in, decoding in `dtype`:
    bfloat16 for int8 (half the bytes a step reads of the cache, at no cost LOGIT_TOLERANCE sees), else `dtype`."""
    import torch

    return torch.bfloat16 if how == "int8" else dtype


def quantize(model: LanguageModel, how: str) -> LanguageModel:
    """`model` (loaded to decode only) with its matmul weights held as `how` says, in place; UserError for a format
    this device cannot decode from."""
    import torch.nn as nn

    from lmlab.inference.int8 import Int8Linear

    if how not in QUANTIZE:
        raise UserError(f"--quantize is {how!r}; it must be one of {', '.join(QUANTIZE)}.")
    if how == "none":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize {how} decodes on a CPU (PyTorch's weight-only int8 kernel), not on {device.type}; "
                        "leave it out, or pass --device cpu.")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and readable(child.in_features):
                setattr(parent, name, Int8Linear(child))
    return model


def readable(inputs: int) -> bool:
    """Whether the kernel reads rows of `inputs` activations: its loops take 16 at a time from aligned addresses on
    AVX-512, 8 elsewhere, with no tail (SwiGLU's widths are multiples of 8)."""
    import torch

    return inputs % (16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8) == 0
