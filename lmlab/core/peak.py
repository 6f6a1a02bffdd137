"""Peak FLOP/s, what MFU divides by (a datasheet's, else measured and cached, standing only if measured quiet), and
the dtype `train.dtype = "auto"` trains in. docs/reference/performance.md ("MFU and the peak") gives the rules."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.core.busy import Load, LoadMeter
from lmlab.core.device import configure, datasheet_peak, dtype_for_capability, processor, synchronize
from lmlab.core.fileio import WriteError, atomic_write_text, writing
from lmlab.core.threads import most_threads

QUIET_MEASUREMENTS = 3  # quiet measurements that must agree with the best to settle a peak
AGREE = 0.9  # a measurement agrees with the best when it reached this share of it
KEPT = 10  # quiet figures kept in an entry (the newest)
WINDOW = 0.25  # seconds a measurement takes the best of
CACHE_FORMAT = 2  # 1's figures may have been measured busy
BF16_MARGIN = 1.5  # autocast's casts around every matmul pay only where bf16 matmuls clearly win
# A training step computes at most this many times the peak, in FLOPs as lmlab counts them (`flops_per_token`): a
# causal kernel skips about half of PaLM's attention term, and a step's matmuls may outrun the measured square's.
STEP_CEILING = 2.0
LEAST_SHARE = 0.1  # a peak measured busy is taken to have had at least this share of the cores
_memo: dict[str, Peak] = {}  # measured once per process


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and how it was had."""

    flops: float
    dtype: str
    source: str  # "datasheet H100" or "measured matmul"
    quiet: bool = True  # measured while nothing else used the cores (a datasheet figure is quiet)
    measured_at: str | None = None  # local time of the best measurement
    load: dict[str, Any] | None = None  # `Load.record()` of that measurement
    measurements: int = 0  # quiet measurements the figure is the best of
    matmul: int = 0
    settled: bool = True  # enough quiet measurements agree: no more are taken
    notes: tuple[str, ...] = field(default=(), compare=False)  # one sentence per thing found wrong with the cache
    native: bool = True  # `native_kernel`

    def describe(self) -> str:
        """E.g. `2048² bfloat16 matmul measured quiet at 2025-11-22 17:40, best of 3`."""
        if self.source != "measured matmul":
            return self.source
        how = f"{self.matmul}² {self.dtype} matmul measured"
        if not self.quiet:
            busy = Load(**self.load).describe() if self.load else "a busy machine"
            return f"{how} while the machine was busy ({busy}) at {self.measured_at}"
        return f"{how} quiet at {self.measured_at}, best of {self.measurements}"

    def brief(self) -> str:
        """`describe` for a table cell: `datasheet H100`, `measured quiet, best of 3, 2025-11-22 17:40:03`."""
        if self.source != "measured matmul":
            return self.source
        return (f"measured quiet, best of {self.measurements}, {self.measured_at}" if self.quiet else
                f"measured busy, {self.measured_at}")

    def mfu(self, flops_per_second: float) -> float | None:
        """The share of this peak; None against a busy or emulated peak (either reads high), or above 1."""
        share = flops_per_second / self.flops
        return share if self.quiet and self.native and share <= 1 else None

    def wrong(self, flops_per_second: float) -> str | None:
        """The warning when a quiet native peak is below what a job computed: that peak is wrong."""
        if not (self.quiet and self.native) or flops_per_second <= self.flops:
            return None
        return (f"warning: {flops_per_second / 1e12:.3g} TFLOP/s were computed, more than the peak of "
                f"{self.flops / 1e12:.3g} ({self.describe()}), so that peak is wrong: no MFU from it (delete "
                f"{cache_path()} to measure it again)")

    def standing(self) -> str:
        """What MFU divides by, in a line, or why there is none."""
        if not self.native:
            return (f"no MFU: {self.dtype} has no native kernel here, so its peak (a {self.describe()}) is an "
                    "emulation's")
        if not self.quiet:
            return f"no MFU: the peak, a {self.describe()}, would overstate it; it is measured again at the next start"
        return f"MFU against {self.flops / 1e12:.3g} TFLOP/s: {self.describe()}"


def peak_flops(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak of `device` in `dtype`: the datasheet's, or measured here (with TF32 on, as lmlab's fp32 runs)."""
    configure(device)
    name = str(dtype).removeprefix("torch.")
    listed = datasheet_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
    if listed:
        return Peak(listed[0], name, listed[1])
    key = cache_key(device, dtype)
    if key not in _memo:  # measured on every thread (`measure_into_cache`), read under any
        _, entry, notes = read_cache(cache_path(), key, processor_identity(device))
        peak = _as_peak(entry, notes) if entry and settled(entry) else measure_into_cache(device, dtype, notes)
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


@contextlib.contextmanager
def every_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, torch on every thread a job may use inside, then on the threads it had."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(most_threads()[0])
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "peak_flops.json"


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on."""
    who = ", ".join(f"{k} {v}" for k, v in processor_identity(device).items() if v)
    threads = f", {most_threads()[0]} threads" if device.type == "cpu" else ""
    tf32 = " (TF32)" if device.type == "cuda" and dtype == torch.float32 else ""
    return (f"{device.type}: {who}{threads}, {str(dtype).removeprefix('torch.')}{tf32}, torch {torch.__version__}, "
            f"{matmul_size(device, dtype)}² matmul")


def processor_identity(device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return processor()
    return {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """The side of the square matmul a peak is measured with: small where a CPU's scalar fallback would stall."""
    if device.type != "cpu":
        return 8192
    return 2048 if native_kernel(device, dtype) else 256


def checksum(entry: dict[str, Any]) -> str:
    """An entry's `sha256`, of its other fields."""
    return hashlib.sha256(json.dumps({k: v for k, v in entry.items() if k != "sha256"}, sort_keys=True)
                          .encode()).hexdigest()


def read_cache(path: Path, key: str, who: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """The cache's entries, this key's entry if it can be trusted, and a sentence per thing wrong (which means
    measuring again, never an error); `who`: this processor."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None, []
    except (OSError, ValueError):
        return {}, None, [f"the peak cache {path} is not valid JSON (damaged, or edited by hand): the peak is "
                          "measured again and the file rewritten."]
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("entries"), dict):
        return {}, None, [f"the peak cache {path} was written by an older lmlab, which kept peaks measured while the "
                          "machine was busy: they are measured again."]
    entries, entry = cache["entries"], cache["entries"].get(key)
    if entry is None:
        others = [e.get("processor") for e in entries.values() if isinstance(e, dict)]
        if not others or who in others:
            return entries, None, []
        names = sorted({str((e or {}).get("name")) for e in others})
        return entries, None, [f"the peak cache {path} holds peaks of other processors only ({', '.join(names)}; "
                               "copied from another machine?): this one is measured."]
    if not _valid(entry):
        return entries, None, [f"the peak cache entry for this processor in {path} does not match its checksum "
                               "(edited by hand, or damaged): the peak is measured again."]
    return entries, entry, []


def _valid(entry: Any) -> bool:
    if not isinstance(entry, dict) or entry.get("sha256") != checksum(entry):
        return False
    flops, figures = entry.get("flops"), entry.get("figures")
    return (isinstance(flops, float) and math.isfinite(flops) and flops > 0 and isinstance(figures, list)
            and all(isinstance(f, float) and 0 < f <= flops for f in figures) and isinstance(entry.get("quiet"), bool))


def settled(entry: dict[str, Any]) -> bool:
    """Whether enough quiet measurements agree with the best for it to stand."""
    return entry["quiet"] and sum(f >= AGREE * entry["flops"] for f in entry["figures"]) >= QUIET_MEASUREMENTS


def measure_into_cache(device: torch.device, dtype: torch.dtype, notes: Sequence[str] = ()) -> Peak:
    """Measure the peak, a window at a time until its entry settles (at most QUIET_MEASUREMENTS windows a start, none
    after a busy one: a quiet machine settles it at its first start), merge each into the cache; what it now holds."""
    path, key = cache_path(), cache_key(device, dtype)
    entries, entry, _ = read_cache(path, key, processor_identity(device))
    with every_thread(device):
        windows = peak_windows(device, dtype, WINDOW)
        for _ in range(QUIET_MEASUREMENTS):
            with LoadMeter() as meter:
                flops = next(windows)
            assert meter.load is not None, "a LoadMeter has its load once its block ends"
            entry = merged(entry, flops, meter.load, dtype, device)
            if settled(entry) or not quiet(meter.load, device):
                break
    assert entry is not None, "QUIET_MEASUREMENTS is at least 1"
    entries[key] = entry
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
    except WriteError as err:  # a cache only saves measuring again
        notes = [*notes, f"the peak cache {err.path} cannot be written ({err.reason}): the peak is measured again "
                         "at every start until it can (XDG_CACHE_HOME names another folder for it)."]
    return _as_peak(entry, list(notes))


def quiet(load: Load, device: torch.device) -> bool:
    """Whether a measurement under `load` is quiet. A GPU's is whatever the CPU's load (torchrun's barriers spin)."""
    return not load.busy or device.type == "cuda"


def merged(entry: dict[str, Any] | None, flops: float, load: Load, dtype: torch.dtype,
           device: torch.device) -> dict[str, Any]:
    """The entry after one more measurement: a quiet one (`quiet`) joins the quiet figures, a busy one replaces only a
    busy entry."""
    calm = quiet(load, device)
    new = {"flops": float(flops), "quiet": calm, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load": load.record()}
    figures = list(entry["figures"]) if entry and entry["quiet"] else []
    best: dict[str, Any]
    if calm:
        figures = [*figures, float(flops)][-KEPT:]
        best = new if entry is None or not figures[:-1] or flops > entry["flops"] else entry
    elif entry and entry["quiet"]:
        best = entry
    else:
        best = new if entry is None or flops > entry["flops"] else entry
    kept = {"processor": processor_identity(device), "threads": most_threads()[0],
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "matmul": matmul_size(device, dtype),
            **{k: best[k] for k in ("flops", "quiet", "measured_at", "load")}, "figures": figures}
    return {**kept, "sha256": checksum(kept)}


def _as_peak(entry: dict[str, Any], notes: list[str]) -> Peak:
    return Peak(entry["flops"], entry["dtype"], "measured matmul", entry["quiet"], entry["measured_at"], entry["load"],
                len(entry["figures"]), entry["matmul"], settled(entry), tuple(notes))


def measured_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square matmul in `dtype` (no cast timed); the first half of `seconds` only warms up."""
    return next(peak_windows(device, dtype, seconds / 2))


def peak_windows(device: torch.device, dtype: torch.dtype, window: float) -> Iterator[float]:
    """The best FLOP/s of a square matmul in `dtype` (no cast timed) in each `window` seconds, after one that only
    warms up."""
    n = matmul_size(device, dtype)
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG, and so training, untouched
    a, b = (torch.randn(n, n, device=device, generator=generator).to(dtype) for _ in range(2))
    repeats = 4 if device.type != "cpu" else 1
    spent = -window
    while True:
        best = 0.0
        while spent < window or not best:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b  # neither needs a gradient: no graph is kept
            synchronize(device)
            elapsed = time.perf_counter() - started
            spent += elapsed
            if spent > 0:
                best = max(best, repeats * 2 * n ** 3 / elapsed)
        yield best
        spent = 0.0


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
