"""Device choice and the mixed-precision setting that is fastest on it."""

from __future__ import annotations

import contextlib
import time

import torch

from lmlab.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available here; use --device cpu or auto.")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name} is unknown; use auto, cpu, cuda or mps.")
    return torch.device(name)


def configure(device: torch.device, threads: int = 0) -> None:
    """Process-wide settings of a training process: `threads` CPU threads for torch (0 leaves one per core), and
    TF32 tensor-core matmuls for fp32 work on CUDA (Ampere and later)."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(device: torch.device, setting: str) -> torch.dtype:
    """Resolve train.dtype; `auto` is bf16 where the hardware computes in it natively, else fp16/fp32.

    On CPUs with AVX-512 BF16 or AMX, bf16 matmuls run several times faster than fp32 (training measured
    1.6x to 2.7x the tokens/s of fp32 on 2 cores, benchmarks/throughput.py), so auto uses them there.
    """
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense peak throughput in TFLOP/s from the vendors' datasheets (no sparsity), by the dtype the matmuls run
# in. float32 on Ampere and later is counted at the TF32 tensor-core rate, since lmlab enables TF32 there.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989, "float16": 989, "float32": 494},
    "H100 NVL": {"bfloat16": 835, "float16": 835, "float32": 418},
    "H100 PCIe": {"bfloat16": 756, "float16": 756, "float32": 378},
    "H100": {"bfloat16": 989, "float16": 989, "float32": 494},  # SXM, named e.g. "H100 80GB HBM3"
    "A100": {"bfloat16": 312, "float16": 312, "float32": 156},
    "A10G": {"bfloat16": 70, "float16": 70, "float32": 35},
    "A10": {"bfloat16": 125, "float16": 125, "float32": 62.5},
    "L40S": {"bfloat16": 362, "float16": 362, "float32": 183},
    "L4": {"bfloat16": 121, "float16": 121, "float32": 60},
    "RTX 4090": {"bfloat16": 165, "float16": 165, "float32": 82.6},
    "RTX 3090": {"bfloat16": 71, "float16": 71, "float32": 35.6},
    "V100": {"float16": 125, "float32": 15.7},
    "T4": {"float16": 65, "float32": 8.1},
}

_measured: dict[tuple[str, torch.dtype], float] = {}


def datasheet_peak(gpu_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """The datasheet peak FLOP/s of a GPU (by the name CUDA reports) in `dtype`, and the table row it came from;
    None for a GPU or dtype the table does not list."""
    for key, peaks in PEAK_TFLOPS.items():  # most specific names first
        if key in gpu_name and str(dtype).removeprefix("torch.") in peaks:
            return peaks[str(dtype).removeprefix("torch.")] * 1e12, f"datasheet {key}"
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from: the datasheet table, or a measured matmul for CPUs and
    GPUs the table does not know."""
    listed = datasheet_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
    if listed:
        return listed
    if (device.type, dtype) not in _measured:
        _measured[(device.type, dtype)] = _measure_matmul(device, dtype)
    return _measured[(device.type, dtype)], "measured matmul"


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n×n matmul in `dtype` (under autocast, as training runs it).

    The first half of the time only warms up: the first calls of a process (kernel JIT, clock ramp-up) were
    measured at 60% of the settled rate on the CPU.
    """
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG, and so training, untouched
    a, b = (torch.randn(n, n, device=device, generator=generator) for _ in range(2))
    best, spent = 0.0, -seconds / 2
    with torch.no_grad(), autocast(device, dtype):
        while spent < seconds:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(4):
                a @ b
            synchronize(device)
            elapsed = time.perf_counter() - started
            spent += elapsed
            if spent > 0:
                best = max(best, 4 * 2 * n ** 3 / elapsed)
    return best


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
