"""Decoding from 8-bit weights on the CPU (`--quantize int8`). At a few rows a decode step is bound by reading its
weights, and int8 reads a quarter of float32's bytes: every matmul's weights are held as int8 with a scale per output
channel, and each step's activations are quantized as they come (PyTorch's dynamic quantization, whose kernels are
fbgemm's). The token table stays float32: a step reads one row of it. AOTInductor compiles no such module, so an int8
model decodes eagerly (benchmarks/llama_cpp_side_by_side.py times it beside the compiled float32 step and llama.cpp's
q8_0). No torch at the top: the commands read QUANTIZE as they parse."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from lmlab.core.errors import UserError

if TYPE_CHECKING:
    from lmlab.model import LanguageModel

QUANTIZE = ("none", "int8")  # the choices of --quantize
# What int8 costs, as tests/test_quantize.py holds it to on trained models: each step's logits within this share of
# their spread (standard deviation) of float32's, so greedy text parts from float32's only after a near tie.
LOGIT_TOLERANCE = 0.15


def tolerance(how: str) -> str:
    """What decoding from weights held as `how` (one of QUANTIZE but none) is and costs, said beside its name."""
    assert how == "int8", how
    return (f"a scale per output channel, activations quantized at each step by fbgemm's kernels; logits within "
            f"{LOGIT_TOLERANCE:.0%} of their spread of float32's, greedy text the same but after a near tie")


def quantize(model: LanguageModel, how: str) -> LanguageModel:
    """`model` (loaded to decode only) with its matmul weights held as `how` says, in place; UserError for a format
    this device cannot decode from."""
    import torch

    if how not in QUANTIZE:
        raise UserError(f"--quantize is {how!r}; it must be one of {', '.join(QUANTIZE)}.")
    if how == "none":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError(f"--quantize {how} decodes on an x86 CPU (fbgemm's int8 kernels), not on {device.type}; leave "
                        "it out, or pass --device cpu.")
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notices of its move to torchao: nothing a user can act on
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model
