"""The int8 matmul kernels PyTorch offers a batch-1 decode step on this CPU, one row of activations against GPT-2
small's weight shapes: how many weight bytes each reads per second, beside float32's.

    python -m benchmarks.int8_kernels [--threads 1] [--repeats 3]      (from the repository root)

What lmlab's int8 step (lmlab.inference.int8) can be built from, each on the same int8 weights with a scale per
output channel: "weight-only, eager" is `torch._weight_int8pack_mm` (activations as bfloat16); "weight-only,
compiled" is the same call compiled by Inductor with its own C++ int8 GEMM template (as `--quantize int8 --compile`
builds it); "oneDNN int8 x int8" quantizes the activations to uint8 at each call (a scale per call) and multiplies
in integers (`onednn.qlinear_pointwise`, what PyTorch's x86 quantizer lowers to); "torch._int_mm" is PyTorch's
integer matmul. A pass applies each of several copies of the weight once, together larger than a CPU's last-level
cache, as a decode step reads each weight once per token (compiled: one graph over the copies, whose call is paid
once a pass). A kernel that reads int8 weights as fast as float32 reads its own is
bound by memory, as llama.cpp's q8_0 is; one slower is bound by its arithmetic. The kernels alternate in each
round; each figure is the best of --repeats rounds.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.inference.int8 import Int8Linear

SHAPES = {"attention in": (768, 2304), "MLP in": (768, 3072), "MLP out": (3072, 768), "head": (768, 50_257)}
COPIES_BYTES = 256e6  # float32 weights held per shape: each call reads a copy no earlier call left in the cache
Kernel = Callable[[int], torch.Tensor]  # one call on the i-th copy of the weights


class Each(nn.Module):
    """Every copy applied to the same row: compiled as one graph, so a call's own cost is paid once a pass."""

    def __init__(self, copies: list[Int8Linear]):
        super().__init__()
        self.copies = nn.ModuleList(copies)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in self.copies)


def passes(inputs: int, outputs: int) -> tuple[dict[str, Callable[[], object]], int]:
    """Each kernel as one pass over copies of a random weight (`outputs` x `inputs`), and the number of copies."""
    copies = max(2, int(COPIES_BYTES // (4 * inputs * outputs)))
    linears = [nn.Linear(inputs, outputs, bias=False) for _ in range(copies)]
    int8 = [Int8Linear(linear) for linear in linears]
    x = torch.randn(1, inputs)
    bf16 = x.to(torch.bfloat16)
    with warnings.catch_warnings(), torch._inductor.config.patch(freezing=True, max_autotune=True,
                                                                 max_autotune_gemm_backends="CPP"):
        warnings.simplefilter("ignore")
        compiled = torch.compile(Each(int8))
        compiled(x)  # compiled here, not timed
    packed = [torch.ops.onednn.qlinear_prepack(m.weight, [1, inputs]) for m in int8]
    scales = [m.scales.float() for m in int8]
    zeros = torch.zeros(outputs, dtype=torch.long)

    def onednn(i: int) -> torch.Tensor:
        low, high = x.min().clamp(max=0), x.max().clamp(min=0)
        scale = (high - low) / 255
        zero = (-low / scale).round().to(torch.int32)
        qx = (x / scale + zero).round().clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(qx, scale, zero, packed[i], scales[i], zeros, None, 1.0, 0,
                                                         torch.float32, "none", [], "")

    each: dict[str, Kernel] = {
        "float32 (nn.Linear)": lambda i: linears[i](x),
        "weight-only, eager": lambda i: torch._weight_int8pack_mm(bf16, int8[i].weight, int8[i].scales),
        "oneDNN int8 x int8": onednn,
        "torch._int_mm": lambda i: torch._int_mm(x.to(torch.int8), int8[i].weight.t()),
    }
    found: dict[str, Callable[[], object]] = {name: (lambda k=kernel: [k(i) for i in range(copies)])
                                              for name, kernel in each.items()}
    found["weight-only, compiled"] = lambda: compiled(x)
    return found, copies


def seconds(run: Callable[[], object], copies: int) -> float:
    """The seconds of one matmul: a pass over the copies, after one untimed."""
    run()
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"One row against GPT-2 small's weights, {args.threads} thread(s), "
                        f"{torch.backends.cpu.get_cpu_capability()}: weight GB/s (µs a call)")
    table.add_column("kernel")
    for name in SHAPES:
        table.add_column(name, justify="right")
    rows: dict[str, list[str]] = {}
    with torch.no_grad(), LoadMeter() as meter:
        for inputs, outputs in SHAPES.values():
            found, copies = passes(inputs, outputs)
            best: dict[str, float] = {}
            for _ in range(args.repeats):
                for name, run in found.items():
                    best[name] = min(best.get(name, float("inf")), seconds(run, copies))
            for name, took in best.items():
                weight = inputs * outputs * (4 if name.startswith("float32") else 1)
                rows.setdefault(name, []).append(f"{weight / took / 1e9:.1f} ({took * 1e6:,.0f})")
    for name, cells in rows.items():
        table.add_row(name, *cells)
    console.print(table)
    if warning := busy_warning("the kernels", meter.load, "each figure may be low"):
        console.print(warning)


if __name__ == "__main__":
    main()
