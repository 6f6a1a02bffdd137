"""Measure training speed: tokens/s, ms/step, MFU and peak memory per batch size, the largest batch that
fits, and what evaluation costs at the configured interval."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.core.busy import MIN_WINDOW, Load, LoadMeter
from lmlab.core.config import RunConfig
from lmlab.core.device import configure, synchronize
from lmlab.core.errors import UserError
from lmlab.core.fileio import host_memory
from lmlab.core.machine import Machine
from lmlab.core.peak import peak_flops
from lmlab.data.shards import read_meta
from lmlab.model import build_model
from lmlab.model.memory import MemoryRefused, check_training
from lmlab.run.checkpoint import load_checkpoint, model_tensors, save_checkpoint
from lmlab.train.estimate import estimate_loss
from lmlab.train.optim import optimizer_of
from lmlab.train.step import TrainStep
from lmlab.train.timing import timed


@dataclass
class BenchRow:
    batch_size: int
    tokens_per_sec: float | None = None
    ms_per_step: float | None = None
    mfu: float | None = None
    peak_memory: int | None = None  # bytes: CUDA memory reserved at the peak, or the process's peak RSS on the CPU
    out_of_memory: bool = False
    note: str | None = None  # why `compile = "auto"` ran eager here, if it did
    peak_note: str | None = None  # that the peak is wrong (below what the steps computed), if it is
    load: Load | None = None  # what else used the machine while the steps were timed


def with_vocab(cfg: RunConfig, meta: dict[str, Any] | None = None) -> RunConfig:
    """`cfg` with its vocab size, from the config or the dataset (`meta`: its meta.json, where read already):
    benchmarks run on random tokens and plans on the meta device, which need nothing else of the data."""
    if cfg.model.vocab_size:
        return cfg
    if meta is None and not (Path(cfg.data.dataset) / "meta.json").exists():
        raise UserError(f"set model.vocab_size or prepare {cfg.data.dataset} first; a benchmark or plan "
                        "needs the vocab size.")
    vocab = (meta or read_meta(Path(cfg.data.dataset)))["vocab_size"]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _peak_memory(device: torch.device) -> int:
    """What the run would need: on CUDA the caching allocator's reserved peak (with the cached blocks it cannot give
    back), else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_memory(device: torch.device) -> None:
    """Start the peak of `_peak_memory` afresh, so each batch size's is its own (on Linux; elsewhere a smaller batch
    timed after a larger one reports the larger one's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _build(cfg: RunConfig, machine: Machine) -> TrainStep:
    """The training loop's step of `cfg` on `machine`."""
    configure(machine.device)
    return TrainStep(build_model(cfg.model).to(machine.device), cfg.train, machine)


def bench_batch(cfg: RunConfig, batch_size: int, steps: int, machine: Machine, warmup: int = 2,
                seconds: float = 0.0) -> BenchRow:
    """Time `steps` training steps (the loop's own `TrainStep`) on `machine`, or more until `seconds` (at least
    MIN_WINDOW, so the load meter beside them can tell a busy machine) have passed, at one micro-batch size; MFU
    against the machine's peak."""
    cfg, device = with_vocab(cfg), machine.device
    check_training(cfg.model, batch_size, optimizer_of(cfg.train).state_bytes, device, setting="--batch-sizes")
    try:
        gc.collect()  # the previous batch size's tensors go before this one's peak is counted
        _reset_peak_memory(device)
        return _timed(cfg, batch_size, steps, machine, warmup, seconds)  # its tensors go as it returns
    except torch.OutOfMemoryError:
        return BenchRow(batch_size, out_of_memory=True)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed(cfg: RunConfig, batch_size: int, steps: int, machine: Machine, warmup: int, seconds: float) -> BenchRow:
    """`bench_batch`'s steps, timed."""
    tc, T, device = cfg.train, cfg.model.block_size, machine.device
    step = _build(cfg, machine)
    x = torch.randint(0, cfg.model.vocab_size, (batch_size, T), device=device)
    batches = [(x, x)] * tc.grad_accum_steps
    for _ in range(warmup):  # warmup steps compile, allocate and fill caches
        step(batches, len(batches), tc.learning_rate)
    synchronize(device)
    with LoadMeter() as meter:
        started, done = time.perf_counter(), 0
        while done < steps or time.perf_counter() - started < max(seconds, MIN_WINDOW):
            step(batches, len(batches), tc.learning_rate)
            done += 1
            if seconds:  # the clock read above must see the step done
                synchronize(device)
        synchronize(device)
        seconds = (time.perf_counter() - started) / done
    rate, peak = batch_size * tc.grad_accum_steps * T / seconds, machine.peak or peak_flops(device, step.dtype)
    computed = rate * step.model.flops_per_token()
    return BenchRow(batch_size, rate, 1000 * seconds, peak.mfu(computed), _peak_memory(device), note=step.note,
                    peak_note=peak.wrong(computed), load=meter.load)


Probe = Callable[[BenchRow, bool, "int | None"], None]


def find_max_batch(cfg: RunConfig, machine: Machine, limit: int = 4096, seconds: float = math.inf,
                   say: Probe = lambda row, fits, budget: None) -> tuple[int, bool]:
    """The largest micro-batch that trains within the memory budget (`memory_budget`), found by `largest_fitting`
    within `seconds`; each batch tried is told to `say`. False with it: the search stopped for time.

    The budget keeps headroom for evaluation, checkpoints and fragmentation (on the CPU, where nothing raises before the
    kernel kills the process, it is the only test). Each try measures memory, not speed: eagerly (eager keeps more
    activations than compiled, so what fits eagerly fits compiled) and over one micro-batch (accumulation adds time, not
    memory)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False, grad_accum_steps=1))
    budget = memory_budget(machine.device)

    def fits(batch: int) -> bool | None:
        try:
            row = bench_batch(cfg, batch, steps=1, machine=machine, warmup=1)
        except MemoryRefused:  # estimated not to fit: not tried
            return None
        say(row, within(row, budget), budget)
        return within(row, budget)

    found, finished = largest_fitting(fits, limit, seconds)
    if not found:
        raise UserError("even a micro-batch of 1 does not fit on this device; use a smaller model or block_size.")
    return found, finished


def largest_fitting(fits: Callable[[int], bool | None], limit: int, seconds: float,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[int, bool]:
    """The largest batch up to `limit` that `fits` (doubling from 1, then bisection; 0: not even 1), and whether the
    search finished. It begins no try `foresee` says would end past `seconds` from its start (the first excepted:
    there is nothing to foresee it from), and then returns the largest batch found so far with False. `fits` gives
    None for a batch refused without a try (estimated not to fit), which takes no time worth foreseeing."""
    started, tries = clock(), dict[int, float]()  # seconds of each batch tried

    def attempt(batch: int) -> bool | None:
        """Whether `batch` fits; None: no time left to try it."""
        if tries and clock() - started + foresee(tries, batch) > seconds:
            return None
        began = clock()
        verdict = fits(batch)
        if verdict is not None:
            tries[batch] = clock() - began
        return bool(verdict)

    low, high = 0, limit + 1  # the largest batch found to fit; the smallest found not to (or past the limit)
    while high - low > 1:
        # doubling till one does not fit or the next passes the limit, then bisecting
        batch = max(1, 2 * low) if high > limit and 2 * low <= limit else (low + high) // 2
        verdict = attempt(batch)
        if verdict is None:
            return low, False
        low, high = (batch, high) if verdict else (low, batch)
    return low, True


GROWTH = 2.0  # the power of the batch a try's seconds are foreseen to grow by, at most


def foresee(tries: dict[int, float], batch: int) -> float:
    """The seconds a try of `batch` is foreseen to take, from the tries made before it (batch: seconds): the largest
    batch tried below it, its seconds grown with the square of the batch. A try is a fixed part (the model built) and
    steps in proportion to its batch; such a time, or one that grows as fast as the square of the batch (a machine
    slowing as memory fills), grows by no more, so the search begins no try that ends past its seconds. The tries
    above it are not asked: one that ran out of memory stopped part way."""
    below = max(b for b in tries if b <= batch)
    return tries[below] * (batch / below) ** GROWTH


GPU_HEADROOM = 0.1  # of the GPU memory free at the start, left for evaluation, checkpoints and fragmentation
CPU_HEADROOM = 0.2  # of the available RAM: RSS also holds the dataset's pages, the interpreter, the libraries


def memory_budget(device: torch.device) -> int | None:
    """Bytes a micro-batch may take at its peak (`BenchRow.peak_memory`); None where it cannot be read."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (1 - GPU_HEADROOM))
    return int(host_memory() * (1 - CPU_HEADROOM)) if device.type == "cpu" else None


def within(row: BenchRow, budget: int | None) -> bool:
    return row.peak_memory is not None and (budget is None or row.peak_memory <= budget)  # None: out of memory


@dataclass
class CheckpointCost:
    """What one checkpoint of a config's run costs here: its bytes, and the best seconds to write it and to load it."""

    bytes: int
    write_seconds: float
    load_seconds: float
    load: Load | None  # of the machine while they were timed


def checkpoint_cost(cfg: RunConfig, machine: Machine, folder: Path = Path("."), repeats: int = 1) -> CheckpointCost:
    """Write a checkpoint of `cfg`'s model and its optimizer state as training writes one, in a temporary folder inside
    `folder` (the disk runs go to), and load it back as a resume does; the best of `repeats` each."""
    cfg, device = with_vocab(cfg), machine.device
    step = _build(cfg, machine)
    ids = torch.zeros(1, min(8, cfg.model.block_size) + 1, dtype=torch.long, device=device)
    step([(ids[:, :-1], ids[:, 1:])], 1, cfg.train.learning_rate)
    writes, loads = [], []
    with LoadMeter() as meter, tempfile.TemporaryDirectory(dir=folder, prefix=".lmlab-checkpoint-") as run:
        for number in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            saved = save_checkpoint(Path(run), number, model_tensors(step.model), step.optimizer.state_dict(),
                                    {"bench": True}, best=False)
            writes.append(time.perf_counter() - started)
            loads.append(timed(partial(load_checkpoint, saved, step.model, step.optimizer), device))
        size = sum(p.stat().st_size for p in saved.iterdir())
    return CheckpointCost(size, min(writes), min(loads), meter.load)


def eval_cost(cfg: RunConfig, ms_per_step: float, machine: Machine) -> dict[str, float]:
    """Time one evaluation (eval_iters batches on each of two splits) and size it to under 5% of training."""
    cfg = with_vocab(cfg)
    tc = cfg.train
    step = _build(cfg, machine)
    device, dtype = step.device, step.dtype
    step.model.eval()
    forward = step.scoring  # as the training loop evaluates: eager on a CPU
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 4 * tc.batch_size * cfg.model.block_size)
    estimate_loss(forward, tokens, cfg.model.block_size, tc.batch_size, 1, 0, device, dtype)  # warm up
    eval_seconds = sum(timed(partial(estimate_loss, forward, tokens, cfg.model.block_size, tc.batch_size,
                                     tc.eval_iters, split, device, dtype), device) for split in range(2))
    split_tokens = 0 if tc.passes_per_eval is None else read_meta(Path(cfg.data.dataset))["train"]["tokens"]
    # the steps between evaluations: eval_interval without passes_per_eval
    train_seconds = cfg.intervals(split_tokens)[0] * ms_per_step / 1000
    return {"eval_seconds": eval_seconds, "share": eval_seconds / (eval_seconds + train_seconds),
            "max_eval_iters_under_5pct": int(0.05 / 0.95 * train_seconds * tc.eval_iters / eval_seconds)}
