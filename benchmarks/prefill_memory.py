"""Peak memory of a prompt's prefill (a forward without gradients into an empty row of the KV cache, the head over no
position, as `Decoder.join` runs it) against what one layer's forward keeps for a backward pass at the same length,
the figure the decoding memory check scales (lmlab.model.memory.PREFILL_SHARE).

    python benchmarks/prefill_memory.py [--lengths 256,2048]

Three shapes of two layers with random weights: GPT-2 small's layer, a grouped-query SwiGLU layer and Qwen3-0.6B's
layer (heads wider than n_embd / n_head). Each is fed a prompt of each length minus one token, in fp32 and under bf16
autocast with its matmul weights held in bf16 (`hold_weights`, as a model loaded to decode holds them). The peak is
glibc's bytes in use (`mallinfo2`) after each op, less those in use before the prefill: the weights and the cache are
left out, as the check counts them apart; a temporary an op frees before it returns is not seen. One thread, so the
figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses

import torch
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.commands.common import console
from lmlab.core.config import ModelConfig
from lmlab.core.device import autocast
from lmlab.inference.decode import hold_weights
from lmlab.model import build_model
from lmlab.model.memory import layer_kept_bytes

SHAPES = {
    "GPT-2 small's layer": dict(n_head=12, n_embd=768, vocab_size=50304),
    "GQA SwiGLU (512 wide, 8:2 heads)": dict(n_head=8, n_kv_head=2, n_embd=512, vocab_size=32000, pos_emb="rope",
                                             norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False),
    "Qwen3-0.6B's layer": dict(n_head=16, n_kv_head=8, head_dim=128, n_embd=1024, vocab_size=4096, pos_emb="rope",
                               norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, mlp_hidden=3072),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back: its heap's and its mmapped blocks'."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class Peak(TorchDispatchMode):
    """The most bytes in use after any op run under it."""

    def __init__(self):
        super().__init__()
        self.most = in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.most = max(self.most, in_use())
        return out


@torch.no_grad()
def prefill_peak(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes a prefill of block_size - 1 tokens holds at its peak beyond the weights and the cache."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    hold_weights(model, dtype)
    cache = model.new_cache(1, torch.device("cpu"), dtype)
    idx = torch.randint(0, 100, (1, config.block_size - 1))
    nowhere = torch.zeros(0, dtype=torch.long)
    with autocast(torch.device("cpu"), dtype):
        before = in_use()
        with Peak() as peak:
            model.logits_at(idx, nowhere, nowhere, cache=cache)
    return peak.most - before


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="256,2048", help="prompt lengths (the context), comma-separated")
    args = p.parse_args()
    torch.set_num_threads(1)
    table = Table("shape", "tokens", "dtype", "prefill peak MiB", "one layer keeps MiB", "share")
    for name, shape in SHAPES.items():
        for length in map(int, args.lengths.split(",")):
            config = ModelConfig(n_layer=2, block_size=length, **shape)
            kept = layer_kept_bytes(dataclasses.replace(config, n_layer=1))
            for dtype in (torch.float32, torch.bfloat16):
                peak = prefill_peak(config, dtype)
                table.add_row(name, f"{length:,}", str(dtype).removeprefix("torch."), f"{peak / 2**20:.1f}",
                              f"{kept / 2**20:.1f}", f"{peak / kept:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
