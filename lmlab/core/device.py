"""Device choice and the mixed-precision setting that is fastest on it."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

from lmlab.core.busy import cores
from lmlab.core.errors import UserError

# The newest torch APIs lmlab calls and the release that brought each: pyproject.toml's floor is the latest.
TORCH_APIS = {
    "torch.optim.Muon": (2, 9),  # train.optimizer = "muon"
    "torch.distributed.fsdp.fully_shard": (2, 6),  # train.parallel = "fsdp", public from 2.6
    "torch._inductor.aoti_compile_and_package": (2, 6),  # the compiled decode step, its package_path= form
    "torch.OutOfMemoryError": (2, 5),  # bench and the command line's one line for a device out of memory
    "enable_gqa": (2, 5),  # scaled_dot_product_attention's grouped-query heads, in every forward
    "torch.nn.RMSNorm": (2, 4),
}
TORCH_FLOOR = max(TORCH_APIS.values())

# The CUDA builds (wheel indexes https://download.pytorch.org/whl/<build>) that every install command names. From 2.12
# there is no cu128 (pytorch/pytorch#178665): cu130 runs 7.5 and later on driver 580+; cu126 keeps 5.0-7.0.
TORCH_RELEASE = "2.13.0"  # the Makefile's TORCH
TORCH_BUILDS = {TORCH_RELEASE: ("cu126", "cu130")}


def install_command(build: str, release: str = TORCH_RELEASE) -> str:
    """pip's command for torch `release` built for CUDA `build` (one of TORCH_BUILDS[release])."""
    if build not in TORCH_BUILDS.get(release, ()):
        raise ValueError(f"PyTorch publishes no {build} build of torch {release} (TORCH_BUILDS)")
    return f"pip install torch=={release} --index-url https://download.pytorch.org/whl/{build}"


def check_torch() -> None:
    """Refuse a torch older than what lmlab calls, rather than fail deep inside a run."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)  # (major, minor) of e.g. `2.13.0+cu130`
    assert found, f"{torch.__version__} is not a torch version"
    here = int(found[1]), int(found[2])
    if here < TORCH_FLOOR:
        needs = ", ".join(api for api, version in TORCH_APIS.items() if version > here)
        raise UserError(f"this is torch {torch.__version__}, and lmlab needs {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} or "
                        f"later (for {needs}); install a newer torch (docs/guides/laptop-to-gpu.md, section 9).")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; a GPU this torch has no kernels for is passed over (`auto`) or
    refused (`cuda`)."""
    check_torch()
    if name == "auto":
        if torch.cuda.is_available():
            problem = unusable_gpu()
            if problem is None:
                return torch.device("cuda")
            _note(f"note: {problem}; computing on the CPU (--device cpu says so and hides this note).")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda was asked for but {no_gpu_reason()}; or use --device cpu or auto.")
    if name == "cuda" and (problem := unusable_gpu()):
        raise UserError(f"--device cuda: {problem}.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available here; use --device cpu or auto.")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name} is unknown; use auto, cpu, cuda or mps.")
    return torch.device(name)


_said: set[str] = set()


def _note(text: str) -> None:
    """A note on stderr, once per process."""
    if text not in _said:
        _said.add(text)
        print(text, file=sys.stderr)


def no_gpu_reason() -> str:
    """Why this torch sees no CUDA GPU, in words."""
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is built without CUDA; install a CUDA build of torch "
                "(docs/guides/laptop-to-gpu.md, section 9)")
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as err:
        if "driver" in str(err).lower() and "too old" in str(err).lower():
            found = re.search(r"found version (\d+)", str(err))
            driver = f" (it supports CUDA {int(found[1]) // 1000}.{int(found[1]) % 1000 // 10})" if found else ""
            return (f"the NVIDIA driver is older than CUDA {torch.version.cuda}, which this PyTorch "
                    f"({torch.__version__}) was built for{driver}; update the driver (580 or newer runs every "
                    f"build), or install a torch built for the CUDA it supports (a CUDA 12 driver: "
                    f"{install_command('cu126')})")
        return f"this PyTorch ({torch.__version__}) cannot use the GPU: {str(err).splitlines()[0]}"
    return (f"this PyTorch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA GPU (CUDA_VISIBLE_DEVICES "
            "may hide them)")


def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list()) has kernels for a GPU of `capability`:
    a cubin of the same major and no higher minor (sm_90a only on 9.0), or PTX of no higher capability."""
    for name in arch_list:
        found = re.fullmatch(r"(?:sm|compute)_(\d+)([a-z]?)", name)  # sm_90a: 9.0 "a", compute_120: 12.0
        assert found, f"{name} is not a CUDA architecture"
        major, minor, suffix = int(found[1]) // 10, int(found[1]) % 10, found[2]
        if name.startswith("compute_") and (major, minor) <= capability:
            return True
        if name.startswith("sm_") and major == capability[0] and (minor == capability[1] or
                                                                   suffix != "a" and minor < capability[1]):
            return True
    return False


def wheel_for(capability: tuple[int, int]) -> str:
    """What to install for a GPU of `capability` (TORCH_BUILDS)."""
    if capability < (5, 0):
        return "no PyTorch build runs compute capability below 5.0 any more: use --device cpu"
    if capability < (7, 5):
        return f"install PyTorch's CUDA 12.6 build, the last with kernels for 5.0 to 7.0 ({install_command('cu126')})"
    return (f"install PyTorch's CUDA 13.0 build ({install_command('cu130')}), which needs NVIDIA driver 580 or "
            f"newer; with an older driver, its CUDA 12.6 build ({install_command('cu126')})")


def unusable_gpu() -> str | None:
    """Why the visible GPU cannot run this torch build, with what to install instead; None when it can (and on
    ROCm)."""
    capability, arch = torch.cuda.get_device_capability(), torch.cuda.get_arch_list()
    nvidia = [name for name in arch if re.fullmatch(r"(?:sm|compute)_\d+[a-z]?", name)]
    if not nvidia or runs_on(capability, nvidia):
        return None
    return (f"the GPU {torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]}) has no "
            f"kernels in this PyTorch ({torch.__version__}, built for {' '.join(nvidia)}); "
            f"{wheel_for(capability)}")


def configure(device: torch.device) -> None:
    """Process-wide settings for computing on `device`, so inference runs as training did: on CUDA, TF32 for fp32
    matmuls and convolutions. Matmuls through set_float32_matmul_precision, which sets the legacy state and
    `fp32_precision` alike (one alone leaves them mixed and the legacy getters raise)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # new in torch 2.9, the floor


def dtype_for_capability(capability: tuple[int, int]) -> torch.dtype:
    """The autocast dtype `auto` picks: bf16 from 8.0, fp16 on 7.x, fp32 below. Not is_bf16_supported(), which
    counts emulation (yes on a T4)."""
    if capability >= (8, 0):
        return torch.bfloat16
    return torch.float16 if capability >= (7, 0) else torch.float32


# Said before the first step waits for a CPU compile (docs/reference/performance.md has the figures).
CPU_COMPILE = ("train.compile = true on a CPU: the first step waits while Inductor compiles the model to C++ (half a "
               "minute or more on a small CPU, seconds from its cache after), and training stays compiled, as asked "
               "(benchmarks/compile_cpu.py measures what that gains here); false or \"auto\" trains eager at once.")


def compile_choice(setting: bool | str, device_type: str, has_triton: bool) -> tuple[bool, str | None]:
    """Whether train.compile compiles on this device, and a line to print first (or None). `auto` compiles on
    CUDA only where Triton works (else it would fail at the first forward); `true` without Triton is refused."""
    if device_type != "cuda":
        return setting is True, CPU_COMPILE if setting is True and device_type == "cpu" else None
    if has_triton:
        return setting is not False, None
    if setting is True:
        raise UserError("train.compile = true needs Triton, which this PyTorch cannot use on this GPU (not "
                        "installed, or the GPU is older than compute capability 7.0); install triton or set "
                        "train.compile = false.")
    return False, "torch.compile needs Triton, which is missing here (or too old for this GPU): training runs eager."


def triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # moved or renamed in some later torch: at least ask whether the package is there
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    return has_triton()


def autocast(device: torch.device, dtype: torch.dtype,
             cache_enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, none in float32; `cache_enabled` as torch.autocast takes it (None: its
    default)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype,
                                                                                 cache_enabled=cache_enabled)


# Dense datasheet TFLOP/s by matmul dtype: float32 at the TF32 rate (lmlab enables it), GeForce at fp32 accumulation
# (how autocast accumulates). A GPU not listed is measured instead. "GB/s": its datasheet memory bandwidth, what the
# kernels that are not matmuls run at (lmlab.experiments.gputime).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989, "float16": 989, "float32": 494, "GB/s": 3350},  # SXM, named e.g. "H100 80GB HBM3"
    "H100 PCIe": {"bfloat16": 756, "float16": 756, "float32": 378, "GB/s": 2000},
    "H100 NVL": {"bfloat16": 835, "float16": 835, "float32": 418, "GB/s": 3900},
    "H200": {"bfloat16": 989, "float16": 989, "float32": 494, "GB/s": 4800},
    "H200 NVL": {"bfloat16": 835, "float16": 835, "float32": 418, "GB/s": 4800},
    "GH200": {"bfloat16": 989, "float16": 989, "float32": 494, "GB/s": 4000},
    "A100": {"bfloat16": 312, "float16": 312, "float32": 156, "GB/s": 2039},  # SXM4
    "A100 PCIe": {"bfloat16": 312, "float16": 312, "float32": 156, "GB/s": 1935},
    "A10": {"bfloat16": 125, "float16": 125, "float32": 62.5, "GB/s": 600},
    "A10G": {"bfloat16": 70, "float16": 70, "float32": 35, "GB/s": 600},
    "A40": {"bfloat16": 149.7, "float16": 149.7, "float32": 74.8, "GB/s": 696},
    "RTX A6000": {"bfloat16": 154.8, "float16": 154.8, "float32": 77.4, "GB/s": 768},
    "L4": {"bfloat16": 121, "float16": 121, "float32": 60, "GB/s": 300},
    "L40": {"bfloat16": 181, "float16": 181, "float32": 90.5, "GB/s": 864},
    "L40S": {"bfloat16": 362, "float16": 362, "float32": 183, "GB/s": 864},
    "RTX 6000 Ada": {"bfloat16": 364.2, "float16": 364.2, "float32": 182.1, "GB/s": 960},
    "RTX 3080": {"bfloat16": 59.5, "float16": 59.5, "float32": 29.8, "GB/s": 760},
    "RTX 3090": {"bfloat16": 71, "float16": 71, "float32": 35.6, "GB/s": 936},
    "RTX 3090 Ti": {"bfloat16": 80, "float16": 80, "float32": 40, "GB/s": 1008},
    "RTX 4070 Ti": {"bfloat16": 80.2, "float16": 80.2, "float32": 40.1, "GB/s": 504},
    "RTX 4080": {"bfloat16": 97.5, "float16": 97.5, "float32": 48.7, "GB/s": 717},
    "RTX 4090": {"bfloat16": 165, "float16": 165, "float32": 82.6, "GB/s": 1008},
    "V100": {"float16": 125, "float32": 15.7, "GB/s": 900},  # SXM2
    "V100 PCIe": {"float16": 112, "float32": 14, "GB/s": 900},
    "V100S PCIe": {"float16": 130, "float32": 16.4, "GB/s": 1134},
    "T4": {"float16": 65, "float32": 8.1, "GB/s": 320},
}


# Name tokens that say nothing about speed. PCIe and NVL stay: those parts run at lower clocks.
_NOISE = re.compile(r"nvidia|geforce|tesla|quadro|rtx|generation|\d+gb|hbm\w*|sxm\d*")

def _model_tokens(name: str) -> frozenset[str]:
    """What identifies a GPU model in a name, e.g. "NVIDIA A100-SXM4-80GB" -> {a100}, "NVIDIA L40S" -> {l40s}."""
    return frozenset(t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and not _NOISE.fullmatch(t))


def datasheet_peak(gpu_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """The datasheet peak FLOP/s of a GPU (CUDA's name or a user's spelling) in `dtype` and the row it came from;
    None if unlisted. Tokens match exactly: a substring would read "L40" as "L4"."""
    tokens, name = _model_tokens(gpu_name), str(dtype).removeprefix("torch.")
    for key, peaks in PEAK_TFLOPS.items():
        if _model_tokens(key) == tokens and name in peaks:
            return peaks[name] * 1e12, f"datasheet {key}"
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What a run ran on, for its record; None where this platform does not say."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(), "cpu_cores": len(cores()), "torch_threads": torch.get_num_threads(),
        "memory_bytes": psutil.virtual_memory().total, "gpu": None, "gpu_count": 0, "gpu_memory_bytes": None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(), "gpu_memory_bytes": props.total_memory}
    elif device is not None and device.type == "mps":
        info |= {"gpu": "Apple MPS", "gpu_count": 1}
    return info


def _cpu_name() -> str | None:
    try:
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True, timeout=5).stdout.strip() or None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or None


def processor() -> dict[str, str | None]:
    """What tells this processor from another, for the peak cache: on Linux the vendor, family, model, stepping
    and a digest of the flags too, since a cloud CPU's name can be as vague as "AMD EPYC"."""
    found: dict[str, str | None] = {"name": _cpu_name() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return found
    first = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    for key in ("vendor_id", "cpu family", "model", "stepping"):
        found[key.replace(" ", "_")] = first.get(key)
    flags = first.get("flags") or first.get("Features")  # x86, Arm
    found["flags_sha256"] = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16] if flags else None
    return found
