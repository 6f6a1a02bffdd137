"""Peak FLOP/s, what MFU divides by (a datasheet's, else measured once on this machine and kept in the machine cache;
measured again at each start while the kept one was measured busy, which gives no MFU), and the dtype
`train.dtype = "auto"` trains in.
docs/reference/performance.md ("MFU and the peak") gives the rules."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core import cache
from lmlab.core.busy import Load, LoadMeter
from lmlab.core.device import PEAK_TFLOPS, configure, datasheet_peak, dtype_for_capability, processor, synchronize
from lmlab.core.threads import most_threads

SECONDS = 0.5  # a measurement: the best matmul of its second half, after a first half that only warms up
BF16_MARGIN = 1.5  # autocast's casts around every matmul pay only where bf16 matmuls clearly win
# A training step computes at most this many times the peak, in FLOPs as lmlab counts them (`flops_per_token`): a
# causal kernel skips about half of PaLM's attention term, and a step's matmuls may outrun the measured square's.
STEP_CEILING = 2.0
LEAST_SHARE = 0.1  # a peak measured busy is taken to have had at least this share of the cores
# The bounds of a peak measured here, outside which a kept one was not measured: a CPU thread computes at most
# THREAD_MOST (AMX's 1,024 bf16 FLOPs a cycle at 5 GHz are 5e12), a GPU ten times the fastest datasheet figure, and
# nothing torch runs on less than LEAST_FLOPS (an emulated matmul on a busy core computes a few GFLOP/s).
THREAD_MOST = 1e13
GPU_MOST = 10e12 * max(figure for row in PEAK_TFLOPS.values() for name, figure in row.items() if name != "GB/s")
LEAST_FLOPS = 1e8
_memo: dict[str, Peak] = {}  # measured once per process


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and how it was had."""

    flops: float
    dtype: str
    source: str  # "datasheet H100" or "measured matmul"
    quiet: bool = True  # measured while nothing else used the cores (a datasheet figure is quiet)
    measured_at: str | None = None  # local time of the measurement
    load: dict[str, Any] | None = None  # `Load.record()` of that measurement
    matmul: int = 0
    native: bool = True  # `native_kernel`

    def describe(self) -> str:
        """E.g. `2048² bfloat16 matmul measured quiet at 2025-11-22 17:40:03`."""
        if self.source != "measured matmul":
            return self.source
        how = f"{self.matmul}² {self.dtype} matmul measured"
        if not self.quiet:
            busy = Load(**self.load).describe() if self.load else "a busy machine"
            return f"{how} while the machine was busy ({busy}) at {self.measured_at}"
        return f"{how} quiet at {self.measured_at}"

    def brief(self) -> str:
        """`describe` for a table cell: `datasheet H100`, `measured quiet, 2025-11-22 17:40:03`."""
        if self.source != "measured matmul":
            return self.source
        return f"measured {'quiet' if self.quiet else 'busy'}, {self.measured_at}"

    def mfu(self, flops_per_second: float) -> float | None:
        """The share of this peak; None against a peak measured busy or an emulated one (either reads high: the
        load slowed the one, the other is no hardware's), or above 1."""
        share = flops_per_second / self.flops
        return share if self.native and self.quiet and share <= 1 else None

    def wrong(self, flops_per_second: float) -> str | None:
        """The warning when a native quiet peak is below what a job computed: that peak is wrong."""
        if not self.native or not self.quiet or flops_per_second <= self.flops:
            return None
        return (f"warning: {flops_per_second / 1e12:.3g} TFLOP/s were computed, more than the peak of "
                f"{self.flops / 1e12:.3g} ({self.describe()}), so that peak is wrong: no MFU from it (delete "
                f"{cache.cache_path()} to measure it again)")

    def standing(self) -> str:
        """What MFU divides by, in a line, or why there is none."""
        if not self.native:
            return (f"no MFU: {self.dtype} has no native kernel here, so its peak (a {self.describe()}) is an "
                    "emulation's")
        if not self.quiet:
            return (f"no MFU: the peak here, {self.flops / 1e12:.3g} TFLOP/s, is a {self.describe()}, and MFU against "
                    "it would read high; a start on a quiet machine measures it again")
        return f"MFU against {self.flops / 1e12:.3g} TFLOP/s: {self.describe()}"


def peak_flops(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak of `device` in `dtype`: the datasheet's, or measured here (with TF32 on, as lmlab's fp32 runs)."""
    configure(device)
    name = str(dtype).removeprefix("torch.")
    listed = datasheet_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
    if listed:
        return Peak(listed[0], name, listed[1])
    key = json.dumps(peak_key(device, dtype), sort_keys=True)
    if key not in _memo:  # measured on every thread (`measure_into_cache`), read under any
        kept = cache.recall("peak", peak_key(device, dtype), _kept_problem(device))
        peak = _as_peak(kept, device, dtype) if kept and kept["quiet"] else measure_into_cache(device, dtype, kept)
        _memo[key] = dataclasses.replace(peak, native=native_kernel(device, dtype))
    return _memo[key]


def step_ceiling(device: torch.device, dtype: torch.dtype) -> tuple[float, Peak]:
    """The most FLOP/s a training step in `dtype` computes here, in lmlab's count: STEP_CEILING times the peak
    (float32's where it is higher and `dtype` has no native kernel), a peak measured busy taken as if it had had the
    cores others took (`unloaded`); and the peak it rests on."""
    peaks = [peak_flops(device, dtype)]
    if not native_kernel(device, dtype):
        peaks.append(peak_flops(device, torch.float32))
    most = max(peaks, key=unloaded)
    return STEP_CEILING * unloaded(most), most


def unloaded(peak: Peak) -> float:
    """`peak`'s FLOP/s with the cores to itself: a busy measurement had only the share of them others left it."""
    if peak.quiet:
        return peak.flops
    others = (peak.load or {}).get("others")
    return peak.flops / max(LEAST_SHARE, 1.0 - others if others is not None else 0.0)


def native_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `device` multiplies `dtype` matrices in a kernel of the dtype's own, not emulated in scalar loops."""
    if device.type == "cpu":
        return cpu_native(dtype)
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def cpu_native(dtype: torch.dtype) -> bool:
    """`native_kernel` on this CPU, as oneDNN answers: bf16 with AVX512-BF16 or AMX, fp16 with AVX512-FP16 or
    AMX-FP16."""
    check = {torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
             torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported}.get(dtype)
    return check is None or check()


def emulated_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """The warning for training in a dtype without a native kernel here; or None."""
    if native_kernel(device, dtype):
        return None
    own, fp32 = peak_flops(device, dtype), peak_flops(device, torch.float32)
    return (f"warning: {own.dtype} has no native kernel on this {device.type.upper()}: a {own.matmul}² {own.dtype} "
            f"matmul ran {own.flops / 1e12:.2g} TFLOP/s, a {fp32.matmul}² float32 one {fp32.flops / 1e12:.2g} "
            f"({fp32.flops / own.flops:.0f}x faster); train.dtype = \"auto\" or \"float32\" trains faster here")


def peak_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a measured peak depends on: the processor, the threads a job may use, the dtype (with TF32 on a GPU's
    float32), torch and the matmul's size."""
    return {"processor": processor_identity(device), "threads": most_threads()[0] if device.type == "cpu" else None,
            "dtype": str(dtype).removeprefix("torch."), "tf32": device.type == "cuda" and dtype == torch.float32,
            "torch": torch.__version__, "matmul": matmul_size(device, dtype)}


def processor_identity(device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return processor()
    return {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """The side of the square matmul a peak is measured with: small where a CPU's scalar fallback would stall."""
    if device.type != "cpu":
        return 8192
    return 2048 if native_kernel(device, dtype) else 256


def _kept_problem(device: torch.device) -> Callable[[Any], str | None]:
    """What no measurement of `device`'s peak gives, in a kept one (lmlab.core.cache.recall): None where nothing."""
    def problem(entry: Any) -> str | None:
        flops = entry.get("flops") if isinstance(entry, dict) else None
        if not (isinstance(flops, float) and isinstance(entry.get("quiet"), bool)
                and isinstance(entry.get("measured_at"), str) and Load.recorded(entry.get("load"))):
            return "a peak whose fields are not those a measurement writes"
        most = THREAD_MOST * most_threads()[0] if device.type == "cpu" else GPU_MOST  # on the threads a job may use
        if LEAST_FLOPS <= flops <= most:  # NaN is not
            return None
        return f"a peak of {flops:.3g} FLOP/s, outside the {LEAST_FLOPS:.0e} to {most:.3g} this {device.type} computes"

    return problem


def measure_into_cache(device: torch.device, dtype: torch.dtype, kept: dict[str, Any] | None = None) -> Peak:
    """Measure the peak (on a CPU, on every thread a job may use, then on the threads torch had) and keep it, unless it
    was measured busy and `kept` (the cache's, measured busy) is faster: load only ever slows a matmul, so the faster
    stands until a quiet measurement replaces it."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(most_threads()[0])
    try:
        with LoadMeter() as meter:
            flops = measured_peak(device, dtype, SECONDS)
    finally:
        torch.set_num_threads(before)
    assert meter.load is not None, "a LoadMeter has its load once its block ends"
    calm = quiet(meter.load, device)
    if kept and not calm and kept["flops"] >= flops:
        return _as_peak(kept, device, dtype)
    entry = {"flops": flops, "quiet": calm, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
             "load": meter.load.record()}
    cache.keep("peak", peak_key(device, dtype), entry)
    return _as_peak(entry, device, dtype)


def quiet(load: Load, device: torch.device) -> bool:
    """Whether a measurement under `load` is quiet. A GPU's is whatever the CPU's load (torchrun's barriers spin)."""
    return not load.busy or device.type == "cuda"


def _as_peak(entry: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Peak:
    return Peak(entry["flops"], str(dtype).removeprefix("torch."), "measured matmul", entry["quiet"],
                entry["measured_at"], entry["load"], matmul_size(device, dtype))


def measured_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square matmul in `dtype` (no cast timed); the first half of `seconds` only warms up."""
    n = matmul_size(device, dtype)
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG, and so training, untouched
    a, b = (torch.randn(n, n, device=device, generator=generator).to(dtype) for _ in range(2))
    repeats = 4 if device.type != "cpu" else 1
    spent, best = -seconds / 2, 0.0
    while spent < seconds / 2 or not best:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b  # neither needs a gradient: no graph is kept
        synchronize(device)
        elapsed = time.perf_counter() - started
        spent += elapsed
        if spent > 0:
            best = max(best, repeats * 2 * n ** 3 / elapsed)
    return best


def choose_dtype(device: torch.device, setting: str, born: str | None = None) -> tuple[torch.dtype, str]:
    """The autocast dtype of train.dtype on `device`, and why, in words; `born`: the dtype the weights were trained
    in (bf16 ones are not run in fp16, whose range their activations can exceed)."""
    if setting != "auto":
        return getattr(torch, setting), "train.dtype"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        chosen, at = dtype_for_capability(capability), f"compute capability {capability[0]}.{capability[1]}"
        if chosen == torch.float16 and born == "bfloat16":
            return torch.float32, (f"auto: float32, not float16: these weights were trained in bfloat16, which this "
                                   f"GPU ({at}) lacks, and their activations can overflow float16")
        return chosen, f"auto: {str(chosen).removeprefix('torch.')} at {at}"
    if device.type != "cpu" or not native_kernel(device, torch.bfloat16):
        return torch.float32, f"auto: float32 ({device.type} without native bf16)"
    fp32, bf16 = peak_flops(device, torch.float32), peak_flops(device, torch.bfloat16)
    ratio = bf16.flops / fp32.flops
    chosen = torch.bfloat16 if ratio >= BF16_MARGIN else torch.float32
    how = "quiet" if fp32.quiet and bf16.quiet else "busy: measured again next time"
    side = matmul_size(device, torch.bfloat16)
    return chosen, (f"auto: a {side}² matmul runs {bf16.flops / 1e12:.2f} TFLOP/s in bfloat16, "
                    f"{fp32.flops / 1e12:.2f} in float32 on this CPU, {ratio:.2f}x; bf16 pays from {BF16_MARGIN:g}x; "
                    f"measured {how}")


def autocast_dtype(device: torch.device, setting: str) -> torch.dtype:
    """The dtype of `choose_dtype`, without the reason."""
    return choose_dtype(device, setting)[0]
