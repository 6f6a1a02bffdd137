"""The decode step compiled ahead of time (AOTInductor) for any number of rows up to a capacity, reading any length of
their decode state up to the context: at a few rows a step is bound by Python and dispatch overhead, and compiled to a
C++ library with the weights frozen in, a step is one call into C++. Compiling is slow, so it is for a long-lived server
or a long generation.

The server keeps what it compiles (`kept_step`, `load_kept`): a package keyed by everything the compiled code depends on
(`step_key`). A package is native code: it is loaded only from a folder no one else may write, and only when its sha256
is the one written beside it when it was built; else it is refused (`StepRefused`). `python -m lmlab.inference.compiled`
builds one in a process of its own."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import signal
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmlab.core.config import ModelConfig
from lmlab.core.device import machine
from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError, atomic_write_text, check_writable, read_text, sha256_file
from lmlab.core.jsontext import json_sha256, parse_json
from lmlab.core.threads import most_threads
from lmlab.core.version import __version__
from lmlab.inference.decode import Step, step_logits
from lmlab.inference.quantize import QUANTIZE, held_as, quantize, state_dtype
from lmlab.model import LanguageModel, build_model
from lmlab.model.base import DecodeState, new_state


class _StepModule(nn.Module):
    """The decode step as a module of plain tensors, as torch.export takes it."""

    def __init__(self, model: LanguageModel, kind: type[DecodeState], dtype: torch.dtype):
        super().__init__()
        self.model, self.kind, self.dtype = model, kind, dtype

    def forward(self, idx: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        return step_logits(self.model, self.dtype, idx, self.kind.over(state))


def compilable(model: LanguageModel) -> bool:
    """Whether `model` keeps a decode state a compiled step can carry (asked on the meta device: nothing allocated)."""
    return model.new_cache(1, torch.device("meta"), torch.float32) is not None


def compile_step(model: LanguageModel, capacity: int, dtype: torch.dtype) -> Step:
    """The decode step of `model` (in eval mode, `compilable`: steps.choose_step chooses no compiled step for a model
    that keeps no decode state) for 1 to `capacity` rows on up to as many CPU threads as a job may take
    (`built_threads`), compiled; raises UserError when this machine cannot compile it (no C++ compiler, an unsupported
    device)."""
    with tempfile.TemporaryDirectory() as folder:
        return load_step(build_package(model, capacity, dtype, Path(folder) / "step.pt2"))


def built_threads(threads: int | None) -> int:
    """The thread count a CPU step's kernels split their work for: `threads`, else as many as a job may take (a
    command's ceiling, lmlab.core.threads.most_threads). Built with Inductor's dynamic threads, the kernels run on as
    many as OpenMP has when called, so a step follows what the load leaves mid-decode (`ThreadChooser.stepped`) with
    one build for every count; on fewer it runs slower than a step built for them, far less than a step stalled by a
    loaded core (docs/reference/performance.md)."""
    return threads or most_threads()[0]


def build_package(model: LanguageModel, capacity: int, dtype: torch.dtype, path: Path,
                  threads: int | None = None) -> Path:
    """Compile the decode step of `model` (in eval mode, `compilable`) for 1 to `capacity` rows on up to `threads`
    CPU threads (`built_threads`) into the package `path`; raises UserError as `compile_step` does."""
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"the compiled decode step runs on cpu and cuda, not {device.type}; leave out --compile.")
    block = model.config.block_size
    held = held_as(model)
    sample = new_state(model, max(2, capacity), device, state_dtype(held, dtype)).rows(0, min(2, capacity))
    sample = sample.shortened(min(block, 64))
    idx = torch.zeros(len(sample.pos), 1, dtype=torch.long, device=device)
    options: dict[str, Any] = {"freezing": True, "autotune_num_choices_displayed": 0,
                               "max_autotune_report_choices_stats": False, "max_autotune": autotuned(device),
                               "cpp.threads": built_threads(threads), "cpp.dynamic_threads": True}
    if held == "int8":
        # Inductor's own int8 GEMM for every matmul: left to choose, it calls PyTorch's kernel for some, which decoded
        # slower (benchmarks/llama_cpp_side_by_side.py, with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=CPP and without)
        options["max_autotune_gemm_backends"] = "CPP"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Inductor's own deprecation notices, nothing a user can act on
            program = torch.export.export(_StepModule(model, type(sample), dtype), (idx, *sample.tensors()),
                                          dynamic_shapes=_dynamic_shapes(sample, capacity, block))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)
    except Exception as err:  # a missing or failing C++ compiler surfaces as one of Inductor's many errors
        raise UserError(f"compiling the decode step failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "leave out --compile to decode without it.") from err
    return path


def autotuned(device: torch.device) -> bool:
    """Whether Inductor tunes the step's GEMMs: on a CPU, where its own beat a library call per matmul at a few rows
    (on a GPU tuning takes too long to build); Inductor's own TORCHINDUCTOR_MAX_AUTOTUNE, where set, decides instead
    (0: a faster build of a slower step; docs/reference/serving.md)."""
    own = os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE")
    return own == "1" if own is not None else device.type == "cpu"


def _dynamic_shapes(sample: DecodeState, capacity: int, block_size: int) -> tuple[Any, ...]:
    """What varies from call to call of a step: the rows and the positions it reads of the state (up to the context), so
    a step at a short position reads only its rows' live part of the cache."""
    rows = torch.export.Dim("rows", min=1, max=capacity) if capacity > 1 else None
    length = torch.export.Dim("length", min=1, max=block_size) if block_size > 1 else None

    def varying(positions: int | None) -> dict[int, Any]:
        return {dim: size for dim, size in ((0, rows), (positions, length)) if dim is not None and size is not None}

    return varying(None), tuple(varying(positions) for positions in sample.length_dims())


def load_step(package: Path) -> Step:
    """The decode step in a package `build_package` wrote."""
    runner = torch._inductor.aoti_load_package(str(package))
    return lambda idx, state: runner(idx, *state.tensors())


def step_key(config: ModelConfig, weights_sha256: str, capacity: int, dtype: torch.dtype, device: torch.device,
             quantized: str = "none", threads: int | None = None) -> str:
    """What a compiled step depends on, hashed: a kept package is used only where every part of it is the same
    (`quantized`: the format its weights were quantized to, lmlab.inference.quantize; `threads`: the most it runs on,
    `built_threads`, not the count the load left at the start, which the step follows)."""
    source = hashlib.sha256()
    # the model's code, this module's and the step it compiles (decode.step_logits)
    here = Path(__file__)
    for path in sorted((here.parents[1] / "model").glob("*.py")) + [here, here.with_name("decode.py")]:
        source.update(path.read_bytes())
    facts = {"weights": weights_sha256, "model": asdict(config), "capacity": capacity, "dtype": str(dtype),
             "device": device.type, "autotuned": autotuned(device), "threads": built_threads(threads),
             "torch": torch.__version__, "cpu": machine()["cpu"], "isa": torch.backends.cpu.get_cpu_capability(),
             "source": source.hexdigest(), "lmlab": __version__}
    if quantized != "none":  # a float step's key stays what it was: the packages kept before still match
        facts["quantized"], facts["state"] = quantized, str(state_dtype(quantized, dtype))
    if device.type == "cuda":  # its kernels are built for this GPU's architecture and this CUDA: a shared cache
        facts["gpu"] = {"name": torch.cuda.get_device_name(device),  # may hold another GPU's
                        "capability": list(torch.cuda.get_device_capability(device)), "cuda": torch.version.cuda}
    return json_sha256(facts)[:32]


def weights_sha256(folder: Path) -> str:
    """The sha256 of a step folder's model.safetensors: as its state.json records it, or read."""
    recorded = (parse_json(read_text(folder / "state.json")).get("files") or {}).get("model.safetensors")
    return recorded or sha256_file(folder / "model.safetensors")


KEEP = 4  # packages kept, the most recently used


class StepRefused(Exception):
    """A kept step that must not be run: the sentence says why."""


def kept_steps() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "compiled"


def check_folder(folder: Path) -> None:
    """StepRefused unless `folder` is this user's and no one else may write it (what it holds is run as code)."""
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise StepRefused(f"the kept compiled steps in {folder} are not used: the folder is writable by others or "
                          f"not this user's (mode {info.st_mode & 0o777:o}, owner {info.st_uid}); `chmod go-w` it, or "
                          "delete it")


def kept_step(key: str) -> Path | None:
    """The kept package of `key`, marked as just used; None when there is none; StepRefused when its folder is not safe
    to load from."""
    path = kept_steps() / f"{key}.pt2"
    if not path.is_file():
        return None
    check_folder(path.parent)
    with contextlib.suppress(OSError):  # a read-only cache: the package still loads, only its age is not kept
        path.touch()
    return path


def load_kept(path: Path) -> tuple[Step, str]:
    """The decode step in the kept package `path` and its sha256, once the package's bytes are the ones its digest file
    names; StepRefused (the package deleted) when they are not."""
    check_folder(path.parent)
    digest, written = sha256_file(path), _digest_file(path)
    try:
        expected = read_text(written, 4096).split()[0]
    except (OSError, UserError, IndexError, ValueError):  # missing, no file, empty or not text: not the one built
        expected = None
    if digest != expected:
        path.unlink(missing_ok=True)
        written.unlink(missing_ok=True)
        raise StepRefused(f"the kept compiled step {path} is not the one built there (its sha256 is not the one in "
                          f"{written.name}: damaged or changed); deleted")
    return load_step(path), digest


def _digest_file(package: Path) -> Path:
    return package.with_suffix(".sha256")


def forget_old_steps(keep: int = KEEP) -> None:
    """Delete all but the `keep` most recently used packages with their digests (and leftovers of builds that died)."""
    folder = kept_steps()
    for leftover in folder.glob(".*.tmp-*.pt2"):  # a build's own name (.pt2 last: AOTInductor insists)
        if not Path(f"/proc/{leftover.name.split('.tmp-')[1].removesuffix('.pt2')}").exists():
            leftover.unlink(missing_ok=True)
    packages = sorted(folder.glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[keep:]:
        old.unlink(missing_ok=True)
        _digest_file(old).unlink(missing_ok=True)


def kept_or_compiled(model: LanguageModel, weights_sha256: str, capacity: int, dtype: torch.dtype,
                     quantized: str = "none", say: Callable[[str], None] = lambda line: None) -> Step:
    """The compiled decode step of `model` (in eval mode, `compilable`; its weights hash to `weights_sha256`, then
    quantized to `quantized`) as `compile_step` builds it, for every call of the same weights on this machine: the
    package kept under its key (`step_key`), else compiled (a minute or more) and kept there; compiled for this call
    alone where the kept ones cannot be used (a folder others may write, or one that cannot be written). `say` hears
    what a user waits for or should know, before the wait."""
    key = step_key(model.config, weights_sha256, capacity, dtype, next(model.parameters()).device, quantized)
    try:
        path = kept_step(key)
        if path is not None:
            try:
                return load_kept(path)[0]
            except StepRefused as err:
                say(f"{err}; compiling it again")
        say(f"compiling the decode step (a minute or more; kept in {kept_steps()} for the next calls)")
        return load_step(keep_package(model, key, capacity, dtype))
    except (StepRefused, WriteError) as err:
        say(f"{err}; compiling the decode step for this call alone (a minute or more)")
        return compile_step(model, capacity, dtype)


def keep_package(model: LanguageModel, key: str, capacity: int, dtype: torch.dtype, threads: int | None = None) -> Path:
    """Compile `model`'s step (`build_package`) into the kept package of `key`, which runs (`check_runs`) and has its
    digest beside it; its path. WriteError where the folder cannot be written, StepRefused where it is not safe to
    load from, both before the compiling."""
    folder = kept_steps()
    with contextlib.suppress(OSError):  # a read-only cache is said by check_writable
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_writable(folder / f"{key}.pt2")  # said before minutes of compiling, not after
    check_folder(folder)
    tmp = folder / f".{key}.tmp-{os.getpid()}.pt2"
    try:
        build_package(model.eval(), capacity, dtype, tmp, threads)
        check_runs(model, tmp, dtype)
        # The digest first: a package is never there without the digest it is checked against.
        atomic_write_text(_digest_file(folder / f"{key}.pt2"), f"{sha256_file(tmp)}  {key}.pt2\n")
        os.replace(tmp, folder / f"{key}.pt2")
    finally:
        tmp.unlink(missing_ok=True)
    forget_old_steps()
    return folder / f"{key}.pt2"


def main(argv: list[str] | None = None) -> None:
    """Build the kept package of a run's checkpoint in a process of its own, so that compiling neither holds the
    server's interpreter nor, if the compiler crashes, takes it down."""
    from lmlab.run.rundir import RunDir

    p = argparse.ArgumentParser(prog="python -m lmlab.inference.compiled")
    p.add_argument("run")
    p.add_argument("folder", help="the step folder whose weights to compile")
    p.add_argument("weights_sha256", help="what the weights must hash to (the server's, checked)")
    p.add_argument("capacity", type=int)
    p.add_argument("dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("threads", type=int, help="the most threads it decodes on (built_threads)")
    p.add_argument("device")
    p.add_argument("quantized", nargs="?", choices=QUANTIZE, default="none",
                   help="the format the weights are quantized to first")
    args = p.parse_args(argv)
    # End this process when its parent (the server) dies, even by SIGKILL (Linux: PR_SET_PDEATHSIG; elsewhere the
    # server ends it when it stops).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    torch.set_num_threads(args.threads)  # the autotuning times the kernels on as many as they are built for
    run = RunDir(Path(args.run))
    model = build_model(run.config().model).to(args.device)
    try:
        run.read_checkpoint(Path(args.folder), model)
        if weights_sha256(Path(args.folder)) != args.weights_sha256:
            raise UserError(f"{args.folder} no longer holds the weights being served; not compiled.")
        dtype, device = getattr(torch, args.dtype), torch.device(args.device)
        quantize(model, args.quantized)
        key = step_key(run.config().model, args.weights_sha256, args.capacity, dtype, device, args.quantized,
                       args.threads)
        kept = keep_package(model, key, args.capacity, dtype, args.threads)
    except (UserError, OSError, StepRefused) as err:  # the reason, in the one line the server logs
        raise SystemExit(str(err))
    print(kept)


def check_runs(model: LanguageModel, package: Path, dtype: torch.dtype) -> None:
    """Load `package` and decode one token with it, here, before it is kept: a package that crashes its loader (as
    AOTInductor's did on CUDA with torch 2.11: docs/reference/serving.md) takes down this process, not the server.
    UserError when the token's logits are not finite."""
    device = next(model.parameters()).device
    state = new_state(model, 1, device, state_dtype(held_as(model), dtype)).shortened(1)
    logits = load_step(package)(torch.zeros(1, 1, dtype=torch.long, device=device), state)
    if not torch.isfinite(logits).all():
        raise UserError("the compiled decode step gave non-finite logits on its first token; not kept.")


if __name__ == "__main__":
    main()
