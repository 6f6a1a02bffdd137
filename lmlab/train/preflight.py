"""What a run settles before its first step, apart from the loop that follows: the config resolved against its
dataset, the autocast dtype and peak (rank 0's, for every rank), the same inputs on every host, and a resumed run's
schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.core.config import RunConfig, TrainConfig
from lmlab.core.config_toml import to_dict
from lmlab.core.errors import UserError
from lmlab.core.machine import Machine
from lmlab.core.peak import emulated_warning
from lmlab.core.threads import ThreadChooser
from lmlab.data.loader import check_block_size
from lmlab.data.shards import read_meta, row_layout
from lmlab.run.rundir import RunDir
from lmlab.train.budget import Budget, Plan
from lmlab.train.distributed import Parallel
from lmlab.train.schedule import Schedule
from lmlab.train.timing import Timing


@dataclass(frozen=True)
class Sized:
    """What `--size auto` settled before the run (lmlab.experiments.sizing): the machine it weighed the sizes on, which
    the run goes on with; its `sizing` event; the chosen size's timing, which a budget plans from; the dataset's
    meta.json, read once."""

    machine: Machine
    event: dict[str, Any]
    timing: Timing
    meta: dict[str, Any]


def resolve_config(cfg: RunConfig, meta: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """Fill model.vocab_size from the dataset and check that a given one covers its ids (an imported model may
    have more embedding rows than its tokenizer has tokens, as Qwen3's do), and that model.block_size fits the
    rows of a row-packed dataset; a warmup in passes made steps (warmup_iters: what the schedule, a checkpoint and
    config.toml hold from then on)."""
    meta = meta or read_meta(Path(cfg.data.dataset))
    tc = cfg.train
    if tc.warmup_epochs:
        steps = tc.warmup_steps(meta["train"]["tokens"], cfg.tokens_per_step)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, warmup_iters=steps, warmup_epochs=0.0))
    check_block_size(row_layout(meta), cfg.model.block_size, f"dataset {cfg.data.dataset}")
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size is {cfg.model.vocab_size} but dataset {cfg.data.dataset} has {meta['vocab_size']} "
            "tokens, more than the model has rows for; point data.dataset at a dataset of the run's tokenizer."
        )
    return cfg, meta


def weights_born_in(run_dir: RunDir, init_from: str | None) -> str | None:
    """The dtype the weights a run starts from were born in, which `auto` heeds on a GPU without bf16: another
    run's with --init-from, else the run's own (a new run has none yet)."""
    return RunDir(Path(init_from.partition(":")[0])).weights_dtype() if init_from else run_dir.weights_dtype()


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # by index, as rank 0 tells the others


def measure_hardware(parallel: Parallel, device: torch.device, setting: str, born: str | None,
                     threads: ThreadChooser) -> Machine:
    """The job's machine: its autocast dtype, why, and the peak MFU divides by. Under torchrun rank 0 measures while
    the other ranks wait, so none loads the cores it measures, and every rank takes rank 0's dtype."""
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


def check_same_inputs(parallel: Parallel, cfg: RunConfig, train_sha256: str | None,
                      val_sha256: str | None) -> None:
    """Under torchrun, refuse a job whose hosts were started with different configs or read different datasets
    (its path may differ from host to host, not its content)."""
    if parallel.world_size == 1:
        return
    settings = {f"{section}.{key}": value for section, fields in to_dict(cfg).items()
                for key, value in fields.items() if f"{section}.{key}" != "data.dataset"}
    parallel.check_same("config", settings, "start every host with the same config and --set options")
    parallel.check_same("dataset", {"train split sha256": train_sha256, "val split sha256": val_sha256},
                        "every host must read the same dataset: keep it on the filesystem they share")


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
