"""`lmlab.train`: a new run from a config, a run continued, or one started from another's weights, as
`lmlab train` trains it (the command calls it), with progress that suits where it runs and a stop signal (Ctrl-C, a
notebook's Kernel > Interrupt) that ends it after a checkpoint it resumes from."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lmlab.api.checks import checked
from lmlab.api.paths import check_destination
from lmlab.core.busy import LoadMeter
from lmlab.core.config import MAX_BUDGET_SECONDS, RunConfig, as_text
from lmlab.core.config_toml import SECTIONS, apply_overrides, build_config, load_config, to_dict, toml_value
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.core.locks import release_held
from lmlab.core.notebook import console_here
from lmlab.train.stop import StopOnSignal

if TYPE_CHECKING:  # PyTorch and the trainer load after the first line is said (`_say_starting`)
    from lmlab.api.run import Run
    from lmlab.train.preflight import Job
    from lmlab.train.reports import TrainResult

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `1.5h` or plain seconds, as seconds: above 0, at most MAX_BUDGET_SECONDS (366 days)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", text[:100])
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"] if match else 0
    if not 0 < seconds <= MAX_BUDGET_SECONDS:
        raise UserError(f"--budget {text[:60]!r} is not a duration above 0 and up to 366 days (8784h); use seconds, "
                        "minutes or hours, e.g. 30s, 5m or 2h.")
    return seconds


@checked(config="config?", run="path?", resume="run?", budget="duration?", device="name", init_from="name?",
         keep_optimizer="flag", force="flag", set="texts", console="console?", started="number?", size="size?")
def train(config: str | Path | RunConfig | None = None, *, run: str | Path | None = None,
          resume: str | Path | Run | None = None, budget: str | float | None = None, device: str = "auto",
          init_from: str | None = None, keep_optimizer: bool = False, force: bool = False, set: Sequence[str] = (),
          console: Console | None = None, started: float | None = None, size: str | int | None = None,
          **overrides: Any) -> Run:
    """Train a run and return it, as `lmlab train` does: from `config` (a TOML preset, or a RunConfig) into `run`
    (default: runs/<config name>), or continuing the run `resume` from its newest checkpoint. `overrides` set config
    keys by name (`max_iters=300`); `set` takes them as the command line does (`["train.max_iters=300"]`). `budget`
    ("30s", "5m", "2h" or seconds) ends the run, start-up included, after that long, counted from `started` (a
    time.perf_counter() reading; default: this call). `init_from` ("RUN" or "RUN:CHECKPOINT") starts from another run's
    weights (with its optimizer state when `keep_optimizer`); `force` resumes although the dataset's content changed.
    `size` is "auto" (the depth of the preset's family predicted to train to the lowest val loss in `budget` here) or a
    depth. A stop signal ends the run after the current step with a checkpoint: `train(resume=run)` continues it
    exactly. The returned Run's `result` says how it ended."""
    window = LoadMeter().start()  # the load while PyTorch loads: what a sizing's thread counts are told by
    started = time.perf_counter() if started is None else started
    out = console or console_here()
    settings = [*set, *_settings(overrides)]
    if budget is not None:
        if resume is not None:
            raise UserError("--budget plans a new run; a resumed run keeps the plan it made (to train it on by "
                            "steps: --set train.budget_seconds=0 --set train.max_iters=N).")
        settings.append(f"train.budget_seconds={parse_duration(str(budget))}")
    size = check_size(size, config, resume, init_from, settings)
    cfg, run_dir = _config(config, run, resume, init_from, settings)
    # A stop signal (or a reader gone from the output) during the set-up: before the run is begun it ends the call
    # at once, nothing written; after, the run stops before its first step, with its checkpoint and its end.
    with StopOnSignal(stuck=None if out.is_jupyter else _give_up, setting_up=True) as setup:
        _say_starting(run_dir, config, cfg, out)
        from lmlab.api.run import Run  # PyTorch: seconds
        from lmlab.experiments.sizing import sized_run
        from lmlab.run.rundir import RunDir
        from lmlab.train.loop import Trainer
        from lmlab.train.preflight import train_job
        from lmlab.train.tracking import require_tracker

        cfg = cfg or RunDir(run_dir).config(settings)
        require_tracker(cfg.train.tracker)  # before the run is begun
        sizing = sized_run(Path(str(config)), size, started, out, setup.interruptible()) if size else None
        job = train_job(cfg, run_dir, device, resume is not None, out, force, init_from, keep_optimizer, started,
                        window, sizing)
        _describe(job, out)
        result = Trainer(job).run()
    _report(result, job.cfg, out, next((e for e in job.events if e["event"] == "sizing"), None))
    trained = Run(result.run_dir, out)
    trained.result = result
    return trained


def check_size(size: str | int | None, config: str | Path | RunConfig | None, resume: Any, init_from: str | None,
               settings: list[str]) -> str | int | None:
    """--size, checked before anything loads (by `lmlab plan --budget` too): a new run's, from a preset file (its
    family's fit is kept beside it), whose shape no setting asks for too."""
    if size is None:
        return None
    from lmlab.experiments.sizing import check_shape_kept, parse_size

    size = parse_size(size)
    check_shape_kept(size, settings)
    if resume is not None:
        raise UserError("--size chooses the shape of a new run; a resumed run keeps its own.")
    if init_from:
        raise UserError("--size chooses a shape, and --init-from continues another run's: pass one of them.")
    if isinstance(config, RunConfig):
        raise UserError("--size sizes a preset's family from its file (its fit is kept beside it); pass the preset's "
                        "path as config, not a RunConfig.")
    return size


def _give_up(signal_name: str) -> None:
    """End a process whose set-up is stuck in one long call after a stop signal and its grace (called from a timer's
    thread): nothing of the run is written yet."""
    release_held()  # the run's lock, taken before its set-up
    print(f"stopped by {signal_name} while it set up: nothing was written (cut off inside a call that cannot be "
          "interrupted)", file=sys.stderr, flush=True)
    os._exit(130)


def _config(config: str | Path | RunConfig | None, run: str | Path | None, resume: str | Path | Run | None,
            init_from: str | None, settings: list[str]) -> tuple[RunConfig | None, Path]:
    """The resolved config with `settings` applied, and the run folder it trains; a resumed run's config is read
    by the caller, once PyTorch is loaded (None here)."""
    if resume is not None and (config is not None or init_from):
        raise UserError("--resume RUN continues a run; pass no CONFIG.toml or --init-from with it "
                        "(use --set to change a resumed run).")
    if resume is not None:
        return None, Path(resume) if isinstance(resume, (str, os.PathLike)) else resume.path
    if isinstance(config, RunConfig):
        if run is None:
            raise UserError("a RunConfig has no file name to name its run after; pass run=\"runs/NAME\".")
        resolved = build_config(apply_overrides(to_dict(config), settings), "the config", settings)
        return resolved, check_destination(run, "--run", "run")
    if config is None:
        raise UserError("lmlab train needs a CONFIG.toml, or --resume RUN to continue a run.")
    cfg = load_config(Path(config), settings)
    return cfg, check_destination(run or Path("runs") / Path(config).stem, "--run", "run")


SECTION_OF = {f.name: section for section in ("data", "model", "train") for f in dataclasses.fields(SECTIONS[section])}


def _settings(overrides: dict[str, Any]) -> list[str]:
    """Keyword overrides (`max_iters=300`) as the command line's `section.key=value`, each key found in the one
    section that has it."""
    settings = []
    for key, value in overrides.items():
        if key not in SECTION_OF:
            raise UserError(f"{key} is no config key of [data], [model] or [train]; docs/reference/config.md lists "
                            "them (e.g. max_iters=300, n_layer=4, dataset=\"data/NAME\").")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, (int, float, str)):  # bool is an int
            raise UserError(f"{key}={as_text(repr(value))}: a config key takes a number, text or True/False.")
        settings.append(f"{SECTION_OF[key]}.{key}={toml_value(value)}")
    return settings


def _say_starting(run_dir: Path, config: str | Path | RunConfig | None, cfg: RunConfig | None, out: Console) -> None:
    """The first line, at once: what is trained, before the seconds that PyTorch, the data's checks and the model take
    (once per torchrun job)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if cfg is None:
        out.print(f"resuming {run_dir}; setting up (PyTorch, the data, the model)...", highlight=False)
        return
    source = "" if isinstance(config, RunConfig) else f" from {config}"
    length = (f"for {format_duration(cfg.train.budget_seconds)}" if cfg.train.budget_seconds else
              f"{cfg.train.max_iters:,} steps")
    out.print(f"training {run_dir}{source}, {length}; setting up (PyTorch, the data, the model)...", highlight=False)


def _describe(job: Job, out: Console) -> None:
    """The model a run trains, where, and the settings its kind ignores."""
    m, step = job.model, job.step
    padding = f"; {m.padding_params():,} more in vocabulary padding" if m.padding_params() else ""
    out.print(f"model: {m.describe()}, {m.num_params() / 1e6:.2f}M parameters ({m.num_params(False) / 1e6:.2f}M "
              f"without embeddings{padding}) | device {step.device} | {str(step.dtype).removeprefix('torch.')}")
    ignored = job.cfg.model.ignored_fields()
    if ignored:
        out.print(f"note: a {job.cfg.model.kind} model does not use {', '.join('model.' + f for f in ignored)}, "
                  "set in its config")


def _report(result: TrainResult, cfg: RunConfig, out: Console, sizing: dict[str, Any] | None = None) -> None:
    """How the run ended and what to do next (in a notebook, how to continue in Python); of a run `--size auto`
    sized (its `sizing` event), its final val beside the val predicted for the steps planned."""
    from lmlab.train.stop import STOP_GRACE

    go_on = (f'lmlab.train(resume="{result.run_dir}")' if out.is_jupyter else
             f"lmlab train --resume {result.run_dir}")
    if result.abandoned:
        kept = (f"its newest checkpoint ({result.saved.name}) is kept; continue with: {go_on}" if result.saved else
                "no checkpoint was written yet; run the same command again to start over")
        out.print(f"stopped by {result.stopped_by} during step {result.steps + 1}, which was abandoned (a step that "
                  f"fails once a stop signal came, or still runs {STOP_GRACE:g} s after it, is given up); {kept}")
        return
    if result.stopped_by:
        out.print(f"stopped by {result.stopped_by} at step {result.steps}; a checkpoint was written. "
                  f"Continue with: {go_on}")
    if result.stopped_early:
        out.print(f"stopped early at step {result.steps}: no new best val loss in {cfg.train.patience_words()}")
    if result.best_val_loss == float("inf"):
        out.print(f"no evaluation ran: the run ended at step {result.steps}, before its first evaluation")
    else:
        out.print(f"best val loss {result.best_val_loss:.4f} at step {result.best_step}")
    if result.budget_line:
        out.print(result.budget_line, highlight=False)
    out.print(f"run: {result.run_dir}")
    out.print(f"loss plot: {result.loss_plot}")
    out.print(_final_words(result), highlight=False)
    predicted, planned = (sizing or {}).get("predicted_val"), (sizing or {}).get("steps")
    if predicted is not None and planned and result.final:
        trained = (f"the {planned:,} steps it planned, and the run trained them" if result.steps == planned else
                   f"the {planned:,} steps it planned; the run trained {result.steps:,} "
                   f"({result.steps / planned:.0%} of them), and the prediction assumed the planned steps")
        out.print(f"size auto predicted val {predicted:.4f} for {trained}: the final val is "
                  f"{result.final['val_loss'] - predicted:+.4f} from it", highlight=False)


def _final_words(result: TrainResult) -> str:
    """The run's figure: the checkpoint it ended on scored on the val split, whole or sampled (then with its error)."""
    f = result.final
    if f is None:
        return (f"no final score: the run was stopped before it; `lmlab eval {result.run_dir} --checkpoint latest` "
                "scores its checkpoint on the whole val split")
    from lmlab.data.shards import covered

    on = covered(f["windows"], f["split_windows"])
    if f["windows"] >= f["split_windows"]:
        return f"final val {f['val_loss']:.4f}: the last checkpoint (step {f['step']}) on {on} ({f['tokens']:,} tokens)"
    return (f"final val {f['val_loss']:.4f} ± {f['stderr']:.4f} (standard error): the last checkpoint (step "
            f"{f['step']}) on {on}, spread evenly ({f['tokens']:,} tokens)")
