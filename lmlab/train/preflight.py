"""What a run settles before its first step, apart from the loop that follows: the `Job`, built once (`train_job`; a
fine-tune's in lmlab.train.finetune) and read by the loop: the config resolved against its dataset, the autocast
dtype and peak (rank 0's, for every rank), the same inputs on every host, the model and its step; and a resumed
run's schedule."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.core.busy import LoadMeter
from lmlab.core.config import RunConfig, TrainConfig
from lmlab.core.config_toml import to_dict
from lmlab.core.device import configure
from lmlab.core.errors import UserError
from lmlab.core.machine import Machine
from lmlab.core.peak import emulated_warning
from lmlab.core.threads import ThreadChooser
from lmlab.data.loader import Batches, BatchLoader, open_tokens, resolve_config
from lmlab.data.shards import TokenShards
from lmlab.model import LanguageModel
from lmlab.model.memory import check_training, fit_micro_batch
from lmlab.run.rundir import RunDir
from lmlab.train.budget import Budget, Plan
from lmlab.train.checkpointer import check_resumable
from lmlab.train.distributed import Parallel, elastic_restart, from_env, setup
from lmlab.train.optim import optimizer_of
from lmlab.train.schedule import Schedule
from lmlab.train.step import TrainStep
from lmlab.train.stop import peer_lost
from lmlab.train.timing import Timing


@dataclass(frozen=True)
class Sized:
    """What `--size auto` settled on the job's machine before the run (lmlab.experiments.sizing): its `sizing` event,
    the chosen size's timing, which a budget plans from, and the dataset's meta.json, read once."""

    event: dict[str, Any]
    timing: Timing
    meta: dict[str, Any]


Sizer = Callable[[RunConfig, Machine], tuple[RunConfig, "Sized | None"]]  # a size chosen on the job's machine


@dataclass(frozen=True)
class Job:
    """A training job as its set-up left it, read by the loop (lmlab.train.loop.Trainer), which builds nothing of
    it: the resolved config, the run folder and how the run begins in it (new, resumed with what --set `changed`,
    from `init_from`'s weights), the parallel layout, the one `Machine` (its threads started), the dataset
    (meta.json, the splits, a step's tokens and a pass's, the checksum a resume compares), the model and its step,
    and the step time a sizing or the cache had. `held` keeps the run's lock and gives torch's threads back when the
    run ends."""

    cfg: RunConfig
    run_dir: RunDir
    console: Console
    held: ExitStack
    parallel: Parallel
    machine: Machine
    meta: dict[str, Any]
    model: LanguageModel
    step: TrainStep
    loader: Batches
    splits: dict[str, TokenShards]  # the dataset's train and val splits (a fine-tune's records are its own)
    micro_steps: int
    tokens_per_step: int
    split_tokens: int
    data_sha256: str
    started: float  # the time.perf_counter() reading a budget counts from
    resume: bool = False
    changed: dict[str, Any] = dataclasses.field(default_factory=dict)
    force: bool = False
    init_from: str | None = None
    keep_optimizer: bool = False
    timing: Timing | None = None
    events: tuple[dict[str, Any], ...] = ()  # logged at a new run's start before the machine's: the sizing's


@contextmanager
def given_back(held: ExitStack, parallel: Parallel, run_dir: RunDir, step: Callable[[], int | None]) -> Iterator[None]:
    """What is `held` given back where the block fails; a failed collective said as the peer it lost (after
    `step()`)."""
    try:
        yield
    except BaseException as err:
        held.close()
        if said := parallel.lost(err):
            raise peer_lost(said, run_dir, step()) from None
        raise


@contextmanager
def holding(run: RunDir, parallel: Parallel, threads: ThreadChooser) -> Iterator[ExitStack]:
    """What a job's set-up holds, given back where it fails, else at the end of its run: the run's lock (rank 0's),
    taken before anything is built, and torch's threads as they were (a process goes on after its run: a notebook,
    the API, tests)."""
    held = ExitStack()
    held.callback(threads.restore)
    with given_back(held, parallel, run, lambda: None):
        if parallel.is_main:
            held.enter_context(run.locked())
        yield held


def train_job(cfg: RunConfig, run_dir: Path, device: str = "auto", resume: bool = False,
              console: Console | None = None, force: bool = False, init_from: str | None = None,
              keep_optimizer: bool = False, started: float | None = None, window: LoadMeter | None = None,
              sizing: Sizer | None = None) -> Job:
    """The job of a new run (of another run's weights with `init_from`, its optimizer's too with `keep_optimizer`) or
    of one resumed (`force`: though its dataset changed), its budget counted from `started` (default: now), in
    torchrun's order: the run's lock, the set-up, rank 0's peak and dtype for every rank; then its threads (by the
    load over `window`, default from now), the size `sizing` chooses on that machine, the data checked against
    meta.json before the model is built, the model and its step."""
    started = time.perf_counter() if started is None else started
    run, parallel = RunDir(run_dir), from_env()
    parallel.local_steps(cfg.train.grad_accum_steps)
    threads = ThreadChooser(cfg.train.threads, "train.threads", fixed="torchrun" if parallel.world_size > 1 else None,
                            window=window)
    with holding(run, parallel, threads) as held:
        cfg, changed = check_resumable(run, cfg) if resume else (cfg, {})  # what --set changes
        parallel, where = setup(device, cfg.train.collective_timeout)
        console = console or Console()
        if not parallel.is_main:
            console.quiet = True
        configure(where)
        machine = measure_hardware(parallel, where, cfg.train.dtype,
                                   weights_born_in(run, init_from) if where.type == "cuda" else None, threads)
        machine.start()
        cfg, sized = sizing(cfg, machine) if sizing else (cfg, None)
        say_hardware(machine, console)
        resolved, meta = resolve_config(cfg, sized.meta if sized else None)
        if cfg.train.warmup_epochs:
            console.print(f"warmup: {cfg.train.warmup_epochs:g} passes over the train split, "
                          f"{resolved.train.warmup_iters:,} steps", highlight=False)
        # A torchrun worker restarted after a failure (--max-restarts) resumes, and so do the workers of a host
        # started again beside it, which its own launcher never restarted.
        resume = resume or (parallel.any(elastic_restart()) and bool(run.step_folders()))
        return _built(resolved, meta, parallel, machine, console, run_dir=run, held=held,
                      started=started, resume=resume, changed=changed, force=force, init_from=init_from,
                      keep_optimizer=keep_optimizer, timing=sized.timing if sized else None,
                      events=(sized.event,) if sized else ())


def _built(cfg: RunConfig, meta: dict[str, Any], parallel: Parallel, machine: Machine, console: Console,
           **rest: Any) -> Job:
    """The job of `cfg` on `machine` (`rest`: its other fields): the micro-batch fitted to memory, the data checked
    against meta.json and the same on every host before the model is built, the model (the same initial weights on
    every rank; under FSDP, no rank holds it whole) and its optimizer step as the machine's rules build it."""
    tc, mc, device = cfg.train, cfg.model, machine.device
    torch.manual_seed(tc.seed)
    state = optimizer_of(tc).state_bytes
    cfg = dataclasses.replace(cfg, train=fit_micro_batch(mc, tc, state, device, parallel.world_size, console.print))
    tc = cfg.train
    check_training(mc, tc.batch_size, state, device, parallel.local_world_size)  # before the data's checksums are read
    with console.status(f"Checking {cfg.data.dataset} against its meta.json..."):
        train, val = (open_tokens(Path(cfg.data.dataset), part, meta["dtype"], meta=meta) for part in ("train", "val"))
    if parallel.world_size > 1:  # every host started alike, on the same data (its path may differ, not its content)
        settings = {f"{section}.{key}": value for section, fields in to_dict(cfg).items()
                    for key, value in fields.items() if f"{section}.{key}" != "data.dataset"}
        parallel.check_same("config", settings, "start every host with the same config and --set options")
        parallel.check_same("dataset", {"train split sha256": train.sha256, "val split sha256": val.sha256},
                            "every host must read the same dataset: keep it on the filesystem they share")
    model, wrapped = parallel.build(mc, tc.parallel, device, machine.dtype)
    parallel.own_rng(tc.seed, 0)
    step = TrainStep(model, tc, machine, wrapped=wrapped, reduce=parallel.reduce_step, agree=parallel.from_main,
                     processes=parallel.local_world_size)
    say_step(step, console)
    BatchLoader(val, mc.block_size, tc.batch_size, tc.seed, "val")  # checks the split is long enough
    return Job(cfg, console=console, parallel=parallel, machine=machine, meta=meta, model=model, step=step,
               loader=BatchLoader(train, mc.block_size, tc.batch_size, tc.seed, "train", device),
               splits={"train": train, "val": val}, micro_steps=parallel.local_steps(tc.grad_accum_steps),
               tokens_per_step=cfg.tokens_per_step, split_tokens=meta["train"]["tokens"],
               data_sha256=meta["train"]["sha256"], **rest)


def say_step(step: TrainStep, console: Console) -> None:
    """A line where `compile = "auto"` could not compile here; the threads held where the step is compiled (Dynamo
    guards on their count: another would recompile it)."""
    if step.note:
        console.print(f"[yellow]{step.note}[/yellow]")
    step.machine.threads.held = step.compiled


def weights_born_in(run_dir: RunDir, init_from: str | None) -> str | None:
    """The dtype the weights a run starts from were born in, which `auto` heeds on a GPU without bf16: another
    run's with --init-from, else the run's own (a new run has none yet)."""
    return RunDir(Path(init_from.partition(":")[0])).weights_dtype() if init_from else run_dir.weights_dtype()


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # by index, as rank 0 tells the others


def measure_hardware(parallel: Parallel, device: torch.device, setting: str | torch.dtype, born: str | None,
                     threads: ThreadChooser) -> Machine:
    """The job's machine: its autocast dtype, why, and the peak MFU divides by. Under torchrun rank 0 measures while
    the other ranks wait, so none loads the cores it measures, and every rank takes rank 0's dtype. A dtype as
    `setting` is a fine-tune's, its base weights': no peak, as its records' lengths make every step's FLOPs another."""
    if isinstance(setting, torch.dtype):
        return Machine(device, setting, threads)
    parallel.barrier()
    machine = Machine(device, torch.float32, threads)
    if parallel.is_main:
        machine = Machine.measured(device, setting, threads, born)
    parallel.barrier()
    machine.dtype = DTYPES[parallel.from_main(DTYPES.index(machine.dtype))]
    return machine


def say_hardware(machine: Machine, console: Console) -> None:
    """The dtype and why, a warning where it has no native kernel here, and what MFU divides by, a line each."""
    console.print(f"dtype {str(machine.dtype).removeprefix('torch.')} ({machine.dtype_reason})")
    if (peak := machine.peak) is None:  # a rank other than 0: it measured nothing, and says nothing
        return
    if slow := emulated_warning(machine.device, machine.dtype):
        console.print(slow, style="yellow", highlight=False)
    console.print(peak.standing(), style=None if peak.quiet and peak.native else "yellow", highlight=False)


def resume_schedule(schedule: Schedule, intervals: tuple[int, int], new: TrainConfig, saved_plan: dict[str, Any] | None,
                    step: int, run_path: Path, lag: int, spent: float) -> str | None:
    """Go on at `step` under the config as resumed, in a process `spent` seconds old whose budget hears of its seconds
    `lag` steps late: a budget's plan, by steps (another process's clock would make resume inexact), or by steps alone,
    from the LR the run had (`Schedule.resume_with`); the line that says what happens to the schedule, if anything."""
    saved = Plan.of(saved_plan) if saved_plan and saved_plan.get("seconds") else None
    if saved_plan and saved and new.budget_seconds == saved.seconds:
        schedule.budget = Budget.resumed(saved_plan, step, intervals, lag, spent)
        return schedule.budget.resume_line()
    if new.budget_seconds:
        planned = (f"planned its {saved.seconds:g} s budget as {saved.max_iters} steps; resume it with that "
                   "budget, or" if saved else "trained by steps; resume it")
        raise UserError(f"{run_path} {planned} with train.budget_seconds=0 and train.max_iters to train "
                        "on by steps (a budget is planned before a new run's first step).")
    schedule.budget = Budget(saved, intervals, live=False) if saved else None  # its plan's LR, gone on by steps
    old_lr = schedule.unscaled_lr(step)
    schedule.budget = None
    return schedule.resume_with(new, step, old_lr)
