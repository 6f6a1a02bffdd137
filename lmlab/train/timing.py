"""What a config's training costs on this machine now, timed before it trains (`time_step` on a run's own step,
`time_config` on a model of its own): a training step and an evaluation's batch; and, with a redraw of the loss plot
as a run here last drew one (`plot_seconds`), a checkpoint's write and the end, the `Costs` a time budget is planned
from (lmlab.train.budget). `lmlab plan --budget`, `--size auto` and the trainer time alike, so they plan alike, and
keep what they timed in the machine cache (lmlab.core.cache): a run of the same shape on the same threads reads it
back (`recall_config`: no model built). Before a size is timed, the least its timing can measure (its FLOPs at the
most a step computes here) says whether a budget could hold it at all (`refuse_untimed`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from lmlab.analysis.plots import plot_losses, pyplot
from lmlab.core import cache
from lmlab.core.config import RunConfig, TrainConfig, as_text
from lmlab.core.device import autocast, synchronize
from lmlab.core.machine import MEASURED, READ_BACK, Machine
from lmlab.core.peak import STEP_CEILING, Peak, processor_identity, step_ceiling
from lmlab.data.shards import windows_in
from lmlab.model import LanguageModel, build_model
from lmlab.model.memory import model_code
from lmlab.run.rundir import RunDir
from lmlab.train.attention import choose_attention
from lmlab.train.budget import BudgetRefused, Costs, plan
from lmlab.train.distributed import Parallel
from lmlab.train.optim import optimizer_of
from lmlab.train.step import TrainStep

# Steps are timed for at least this long (one at least), after an untimed one that warms up, but no more than
# MAX_STEPS; their median is the step, which the budget plans from (then follows the run's pace) and `--size auto`
# chooses by. Longer timings spread as much, the machine's drift (benchmarks/step_timing.py), and delay a first start.
TIMED_SECONDS = 0.4
MAX_STEPS = 10
EXIT_SECONDS = 0.3  # the process's exit after the end's plot: torch's and Python's teardown
# A checkpoint is written at the page cache's pace (atomic and fsynced, the disk's own pace comes after the
# process), after a fixed cost of its files' opening and renaming.
CHECKPOINT_SECONDS = 0.05
DISK_BYTES_PER_SECOND = 1e9
CPU = torch.device("cpu")  # a plot is drawn there
KEPT = ("step", "eval_batch", "checkpoint_bytes", "cost")  # what the machine cache keeps of a `Timing`


@dataclass(frozen=True)
class Timing:
    """A config timed: the threads it ran on, a step, an evaluation's batch (both splits), the bytes a checkpoint
    writes, and the seconds the timing took (read back: when it was measured, which a sizing's share for timing
    counts); a redraw of the loss plot (`plot_seconds`), the attention path its step took, whether its steps were
    timed in full, and whether it was measured now or read back."""

    threads: int
    step: float
    eval_batch: float
    checkpoint_bytes: int
    cost: float
    plot: float = 0.0
    attention: str | None = None
    full: bool = True  # False: the deadline cut it short, its warm-up step (allocations included) the step
    how: str = MEASURED

    def costs(self) -> Costs:
        """The figures a budget plans with: the timed step, evaluation batch and plot, and a checkpoint and the end
        as their writes and the exit take."""
        checkpoint = CHECKPOINT_SECONDS + self.checkpoint_bytes / DISK_BYTES_PER_SECOND
        return Costs(self.step, self.eval_batch, self.plot, checkpoint, self.plot + EXIT_SECONDS)


def time_config(cfg: RunConfig, machine: Machine, deadline: float = math.inf) -> Timing:
    """`cfg` timed on a model of its own (a size no run built yet: `--size auto`, `lmlab plan`, a miniseries) on
    `machine`; kept in the machine cache (`keep`), so the run of that size, and a sized run's `recall_config`, read
    it back."""
    step = TrainStep(build_model(cfg.model).to(machine.device), dataclasses.replace(cfg.train, compile=False), machine)
    timing = time_step(step, cfg, deadline)
    keep(machine, cfg, timing)
    return timing


def recall_config(cfg: RunConfig, model: LanguageModel, machine: Machine) -> Timing | None:
    """`cfg`'s timing as this machine kept it (`keep`), had as `time_config` would time it now but with no model
    built and nothing measured: by the attention path its step would take (`model`: its model on the meta device) on
    torch's threads now. None where it was not kept."""
    path = choose_attention(model, cfg.train, machine, optimizer_of(cfg.train).state_bytes)
    return recall(machine, cfg, model, path)


def recall(machine: Machine, cfg: RunConfig, model: LanguageModel, attention: str | None) -> Timing | None:
    """`cfg`'s timing by `attention` as this machine kept it (`keep`), on torch's threads now; None where it was
    not kept, or holds what no timing here gives: a figure not a positive number, or a step faster than its FLOPs
    (`model`'s) at the most a step computes here."""
    floor = model.flops_per_token() * cfg.tokens_per_step / step_ceiling(machine.device, machine.dtype)[0]

    def problem(kept: Any) -> str | None:
        if not isinstance(kept, dict) or set(kept) != set(KEPT):
            return "a timing without the figures a timing writes"
        if wrong := next((n for n in KEPT if not (type(kept[n]) in (int, float) and 0 < kept[n] < math.inf)), None):
            return f"a {wrong} of {as_text(kept[wrong])}, not a positive number"
        return None if kept["step"] >= floor else (f"a step of {kept['step']:.3g} s, faster than its FLOPs allow at "
                                                   f"the most a step computes here ({floor:.3g} s)")

    kept = cache.recall("timing", timing_key(machine, cfg, attention), problem)
    return None if kept is None else Timing(torch.get_num_threads(), **{name: kept[name] for name in KEPT},
                                            plot=plot_seconds(), attention=attention, how=READ_BACK)


def keep(machine: Machine, cfg: RunConfig, timing: Timing) -> None:
    """Keep `timing` of `cfg` in the machine cache at its attention path and threads. Not one cut short by its
    deadline: its warm-up step is no step."""
    if timing.full:
        kept = {name: getattr(timing, name) for name in KEPT}
        cache.keep("timing", timing_key(machine, cfg, timing.attention, timing.threads), kept)


def timing_key(machine: Machine, cfg: RunConfig, attention: str | None, threads: int = 0) -> dict[str, Any]:
    """What a config's `Timing` depends on: the machine (its processor, device, dtype and torch), the model and the
    code that computes it, the step's batch and optimizer, the attention path and the threads (default: torch's
    now); and the figures kept, so that an entry of other figures is not this one."""
    tc = cfg.train
    return {"processor": processor_identity(machine.device), "device": machine.device.type,
            "dtype": str(machine.dtype), "torch": torch.__version__, "model": dataclasses.asdict(cfg.model),
            "code": model_code(),
            "batch": tc.batch_size, "accum": tc.grad_accum_steps, "optimizer": tc.optimizer, "attention": attention,
            "threads": threads or torch.get_num_threads(), "figures": list(KEPT)}


def run_timing(step: TrainStep, cfg: RunConfig, meta: dict[str, Any], parallel: Parallel, started: float,
               micro: int, console: Console, given: Timing | None = None, refuse: bool = True) -> Timing:
    """The timing a run's budget plans from: `given` (as `--size auto` timed it), else read back from the machine
    cache where a run of its shape was timed, else its own step timed now (`time_step`: every rank, or none) and kept;
    said in the machine's line. Before a timing, `refuse` (one process's) refuses a budget its FLOPs cannot fit
    (`refuse_untimed`; `meta`: the dataset's meta.json, `started`: the time.perf_counter() the budget counts from)."""
    machine = step.machine
    kept = recall(machine, cfg, step.model, step.attention_path)
    if given is not None:
        timing, how = given, "--size auto" + f", {READ_BACK}" * (given.how == READ_BACK)
    elif parallel.any(kept is None):
        if refuse and parallel.world_size == 1:
            refuse_untimed(cfg, meta, time.perf_counter() - started, step.model,
                           step_ceiling(step.device, step.dtype))
        with console.status("Timing a step, as the budget is planned from it..."):
            timing = time_step(step, cfg, started + cfg.train.budget_seconds, parallel.from_main, micro)
        how = MEASURED
        keep(machine, cfg, timing)
    else:
        assert kept is not None, "every rank kept it"
        timing, how = kept, READ_BACK
    machine.said("timing", f"a step {1000 * timing.step:,.1f} ms", how)
    return timing


def time_step(step: TrainStep, cfg: RunConfig, deadline: float = math.inf, agree: Callable[[int], int] = int,
              micro: int = 0) -> Timing:
    """`cfg` timed on `step` (eager, random tokens, its batch and optimizer) on torch's threads now, which it leaves
    untouched (`TrainStep.untouched`): a warm-up step, an evaluation's batch and steps for about
    TIMED_SECONDS. A warm-up step that shows two steps ending past `deadline` (the budget's end) stands for the step (a
    timing not `full`, which no cache keeps): refused sooner. `agree` makes rank 0's count of steps every rank's, whose
    step runs `micro` of the micro-batches (default: all)."""
    train, device, dtype = cfg.train, step.device, step.dtype
    tokens = torch.randint(0, cfg.model.vocab_size, (train.batch_size, cfg.model.block_size),
                           generator=torch.Generator().manual_seed(0)).to(device)
    batches = [(tokens, tokens)] * (micro or train.grad_accum_steps)
    eager = functools.partial(step.eager_step, batches, len(batches), train.learning_rate)
    began = time.perf_counter()
    with step.untouched():
        warm = timed(eager, device)  # the warm-up step, whose allocations the timed steps leave out
        step.model.eval()
        with torch.no_grad(), autocast(device, dtype):
            evaluation = timed(functools.partial(step.scoring, tokens, tokens), device)
        step.model.train()
        fits = time.perf_counter() + 2 * warm <= deadline
        count = agree(min(MAX_STEPS, max(1, math.ceil(TIMED_SECONDS / max(warm, 1e-9)))) if fits else 0)
        times = [timed(eager, device) for _ in range(count)]
    return Timing(torch.get_num_threads(), statistics.median(times or [warm]), 2 * evaluation,
                  checkpoint_bytes(step.model.num_params(), train), time.perf_counter() - began, plot_seconds(),
                  step.attention_path, full=bool(times))


def timing_seconds(step: float, batch: float) -> float:
    """What `time_step` takes, of a `step` of seconds and an evaluation's `batch` of one split: a
    warm-up step, the batch, and the timed steps (TIMED_SECONDS of them, one at least, MAX_STEPS at most)."""
    return step + batch + max(step, min(TIMED_SECONDS, MAX_STEPS * step))


def checkpoint_bytes(params: int, train: TrainConfig) -> int:
    """What a checkpoint of `params` parameters writes: fp32 weights and the optimizer's state."""
    weights = 4 * params
    return weights + optimizer_of(train).state_bytes(weights, 0)


def refuse_untimed(cfg: RunConfig, meta: dict[str, Any], spent: float, model: LanguageModel,
                   ceiling: tuple[float, Peak]) -> None:
    """Refuse `cfg` before it is timed (`BudgetRefused`, naming the budget it needs) where its budget's plan
    (lmlab.train.budget.plan) of the least its timing can measure fits no MIN_STEPS steps in what `spent` seconds and
    the timing leave; `meta`: its dataset's meta.json, `model` its model (on the meta device, where not built).

    That least timing has its steps no faster than their FLOPs at the most a step computes here (`ceiling`,
    lmlab.core.peak.step_ceiling): its step, an evaluation's batch (a forward of a micro-batch, a third of its training
    FLOPs, on both splits), no plot, and the least the timing itself takes: a warm-up step, an evaluation's batch and
    the timed steps."""
    train, (most, peak) = cfg.train, ceiling
    flops_per_step = model.flops_per_token() * cfg.tokens_per_step
    intervals = cfg.intervals(meta["train"]["tokens"])
    step = flops_per_step / most
    forward = step / 3 / train.grad_accum_steps
    least = Timing(0, step, 2 * forward, checkpoint_bytes(model.num_params(), train), timing_seconds(step, forward))
    try:
        plan(train.budget_seconds, spent + least.cost, least.costs(), train, intervals,
             windows_in(meta, "val", cfg.model.block_size))
    except BudgetRefused as refused:
        raise BudgetRefused(train.budget_seconds, refused.least, intervals, gone="that start-up and its timing take",
                            step=(f"at least {least.step:.3g} s here (its {flops_per_step:.3g} FLOPs at "
                                  f"{most / 1e12:.3g} TFLOP/s: {STEP_CEILING:g}x the peak, {peak.brief()})")) from None


def plot_seconds() -> float:
    """A redraw of a run's loss.png on this host, as the last run here to draw one kept it (`kept_plot`); 0 before any
    did: matplotlib's import and a first drawing are not start-up's, and a run's first evaluation, whose cost the
    budget measures as the run goes, counts them."""
    return cache.recall("plot", processor_identity(CPU), lambda kept: None if type(kept) in (int, float) and
                        0 <= kept < math.inf else f"a redraw of {as_text(kept)} s") or 0.0


def kept_plot(run: RunDir) -> None:
    """A run's first drawing of its loss.png, its seconds (matplotlib imported) kept for `plot_seconds`."""
    pyplot()
    cache.keep("plot", processor_identity(CPU), timed(lambda: plot_losses(run), CPU))


def timed(run: Callable[[], object], device: torch.device) -> float:
    """The seconds `run` takes, its work on `device` done: the one stopwatch of what is timed before a run (a step,
    an evaluation's batch, a plot) and of what `lmlab bench` times besides its steps."""
    began = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - began
