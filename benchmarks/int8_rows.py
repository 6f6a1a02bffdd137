"""What a matmul from int8 weights costs by how many rows of activations it multiplies: PyTorch's weight-only int8
kernel beside the weights converted once and multiplied densely in float32 and in bfloat16, and what lmlab's
`int8_matmul` (lmlab.inference.int8_matmul) takes at each count, over GPT-2 small's 12 layers of weights, or with
`--shape demo` the demo model's 4 (256 wide, a SwiGLU MLP).

    python -m benchmarks.int8_rows [--threads 1] [--rows 1,4,8,16,32,64,128,256] [--repeats 3] [--shape gpt2|demo]

A decode step multiplies a row per sequence; a prompt read in one pass, a row per token. Each figure is the
milliseconds of the matmuls of one pass (attention in and out, MLP in and out, random weights), the kernels
alternating in each round, the best of --repeats rounds. An AVX2 host is emulated on a newer one with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` set before the command (bfloat16 is then not native).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.peak import cpu_native
from lmlab.inference.int8 import Int8Linear
from lmlab.inference.int8_matmul import DENSE_ROWS, dense_matmul, int8_matmul

# (in, out) of a layer's matmuls, and the layers: GPT-2 small's, and the demo model's (SwiGLU's gate and value in one)
SHAPES = {"gpt2": (((768, 2304), (768, 768), (768, 3072), (3072, 768)), 12),
          "demo": (((256, 768), (256, 256), (256, 1376), (688, 256)), 4)}


WAYS: dict[str, Callable[[torch.Tensor, Int8Linear], torch.Tensor]] = {
    "int8 kernel": lambda x, m: torch._weight_int8pack_mm(x.to(torch.bfloat16), m.weight, m.scales),
    "dense float32": lambda x, m: dense_matmul(x, m.weight, m.scales, torch.float32),
    "dense bfloat16": lambda x, m: dense_matmul(x, m.weight, m.scales, torch.bfloat16),
    "int8_matmul": lambda x, m: int8_matmul(x, m.weight, m.scales),
}


def seconds(way: Callable[[torch.Tensor, Int8Linear], torch.Tensor], xs: dict[int, torch.Tensor],
            layers: list[Int8Linear]) -> float:
    """One pass of `way` over every layer's matmuls, after one untimed."""
    for _ in range(2):
        started = time.perf_counter()
        for m in layers:
            way(xs[m.in_features], m)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", choices=SHAPES, default="gpt2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes, count = SHAPES[args.shape]
    layers = [Int8Linear(torch.nn.Linear(i, o, bias=False)) for _ in range(count) for i, o in shapes]
    native = "native" if cpu_native(torch.bfloat16) else "not native"
    table = Table("rows", *WAYS, title=f"ms for the {args.shape} shape's {count} layers of int8 matmuls, "
                                       f"{args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}, "
                                       f"bfloat16 {native}; int8_matmul goes dense from {DENSE_ROWS} rows")
    with torch.no_grad(), LoadMeter() as meter:
        for rows in map(int, args.rows.split(",")):
            xs = {i: torch.randn(rows, i) for i in {i for i, _ in shapes}}
            best = dict.fromkeys(WAYS, float("inf"))
            for _ in range(args.repeats):
                for name, way in WAYS.items():
                    best[name] = min(best[name], seconds(way, xs, layers))
            fastest = min(best[name] for name in WAYS if name != "int8_matmul")
            table.add_row(str(rows), *(f"{s * 1e3:,.1f}" + (" *" if s == fastest else "") for s in best.values()))
    console.print(table)
    console.print("*: the fastest of the three ways at that count")
    if warning := busy_warning("the matmuls", meter.load, "each figure may be low"):
        console.print(warning)


if __name__ == "__main__":
    main()
