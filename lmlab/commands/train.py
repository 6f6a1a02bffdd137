"""`lmlab train` (a new run, a resumed one, or one started from another's weights) and `lmlab finetune`."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

from lmlab.commands.common import add_device, add_set, check_destination, console, destination
from lmlab.core.config import MAX_BUDGET_SECONDS
from lmlab.core.errors import UserError


UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `1.5h` or plain seconds, as seconds: above 0, at most MAX_BUDGET_SECONDS (366 days)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", text[:100])
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"] if match else 0
    if not 0 < seconds <= MAX_BUDGET_SECONDS:
        raise UserError(f"--budget {text[:60]!r} is not a duration above 0 and up to 366 days (8784h); use seconds, "
                        "minutes or hours, e.g. 30s, 5m or 2h.")
    return seconds


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.core.busy import process_age

    started = time.perf_counter() - process_age()  # a --budget counts from the process's start
    from lmlab.core.config import load_config

    if args.budget:
        if args.resume:
            raise UserError("--budget plans a new run; a resumed run keeps the plan it made (to train it on by "
                            "steps: --set train.budget_seconds=0 --set train.max_iters=N).")
        args.set.append(f"train.budget_seconds={parse_duration(args.budget)}")
    if args.resume and (args.config or args.init_from):
        raise UserError("--resume RUN continues a run; pass no CONFIG.toml or --init-from with it "
                        "(use --set to change a resumed run).")
    if not args.resume and not args.config:
        raise UserError("lmlab train needs a CONFIG.toml, or --resume RUN to continue a run.")
    cfg = None if args.resume else load_config(Path(args.config), args.set)
    run_dir = Path(args.resume) if args.resume else check_destination(args.run or Path("runs") /
                                                                      Path(args.config).stem, "--run", "run")
    say_starting(run_dir, args.config, cfg)
    from lmlab.run.rundir import RunDir  # PyTorch: seconds
    from lmlab.train.loop import Trainer
    from lmlab.train.stop import STOP_GRACE
    from lmlab.train.tracking import require_tracker

    cfg = cfg or RunDir(run_dir).config(args.set)
    require_tracker(cfg.train.tracker)  # before the run is begun
    trainer = Trainer(cfg, run_dir, args.device, resume=bool(args.resume), console=console, force=args.force,
                      init_from=args.init_from, keep_optimizer=args.keep_optimizer, started=started)
    m = trainer.model
    padding = f"; {m.padding_params():,} more in vocabulary padding" if m.padding_params() else ""
    console.print(f"model: {m.describe()}, {m.num_params() / 1e6:.2f}M parameters ({m.num_params(False) / 1e6:.2f}M "
                  f"without embeddings{padding}) | device {trainer.device} | {str(trainer.dtype).removeprefix('torch.')}")
    ignored = trainer.cfg.model.ignored_fields()
    if ignored:
        console.print(f"note: a {trainer.cfg.model.kind} model does not use {', '.join('model.' + f for f in ignored)}, "
                      "set in its config")
    result = trainer.run()
    if result.abandoned:
        kept = (f"its newest checkpoint ({result.saved.name}) is kept; continue with: lmlab train --resume "
                f"{result.run_dir}" if result.saved else "no checkpoint was written yet; run the same command again "
                "to start over")
        console.print(f"stopped by {result.stopped_by} during step {result.steps + 1}, which was abandoned (a step "
                      f"still running {STOP_GRACE:g} s after a stop signal is not waited for); {kept}")
        return
    if result.stopped_by:
        console.print(f"stopped by {result.stopped_by} at step {result.steps}; a checkpoint was written. "
                      f"Continue with: lmlab train --resume {result.run_dir}")
    if result.stopped_early:
        console.print(f"stopped early at step {result.steps}: no new best val loss in {cfg.train.patience_words()}")
    if result.best_val_loss == float("inf"):
        console.print(f"no evaluation ran: the run ended at step {result.steps}, before its first evaluation")
    else:
        console.print(f"best val loss {result.best_val_loss:.4f} at step {result.best_step}")
    if result.budget_spent is not None:
        spent, budget = result.budget_spent, trainer.cfg.train.budget_seconds
        share = 100 * (spent / budget - 1)
        console.print(f"budget {budget:g} s: the run ended {spent:.1f} s after the command started "
                      f"({spent - budget:+.1f} s" + (f", {share:+.1f}%)" if abs(share) < 100 else ")"))
    console.print(f"run: {result.run_dir}")
    console.print(f"loss plot: {result.loss_plot}")


def say_starting(run_dir: Path, config: str | None, cfg: Any) -> None:
    """The command's first line, at once: what it trains, before the seconds that PyTorch, the data's checks and
    the model take (once per torchrun job: its first process)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if cfg is None:
        console.print(f"resuming {run_dir}; setting up (PyTorch, the data, the model)...", highlight=False)
        return
    from lmlab.core.humanize import format_duration

    length = (f"for {format_duration(cfg.train.budget_seconds)}" if cfg.train.budget_seconds else
              f"{cfg.train.max_iters:,} steps")
    console.print(f"training {run_dir} from {config}, {length}; setting up (PyTorch, the data, the model)...",
                  highlight=False)


def cmd_finetune(args: argparse.Namespace) -> None:
    import dataclasses

    from lmlab.core.config import load_finetune_config
    from lmlab.train.finetune import finetune
    from lmlab.run.rundir import RunDir
    from lmlab.train.stop import STOP_GRACE

    if args.run:  # the spelling before --out, which import-hf and answer use: it still works, and says so
        if args.out:
            raise UserError("--run is the old spelling of --out; pass --out alone.")
        console.print("note: `finetune --run` is now `finetune --out`, as import-hf and answer spell it; --run still "
                      "works", style="yellow", highlight=False)
    ft = load_finetune_config(args.config and Path(args.config), args.set)
    ft = dataclasses.replace(ft, data=args.data) if args.data else ft
    run_dir = check_destination(args.out or args.run or Path("runs") / f"{Path(args.base).name}-{Path(ft.data).stem}",
                                "--out", "run")
    result = finetune(Path(args.base), run_dir, ft, args.device, console)
    if result.stopped_by:
        how = (f"during a step, which was abandoned (a step still running {STOP_GRACE:g} s after a stop signal is "
               "not waited for)" if result.abandoned else "after a step, and a checkpoint was written")
        again = "to continue it" if result.saved else "to start it over (no checkpoint was written yet)"
        console.print(f"stopped by {result.stopped_by} {how}; run the same command again {again}: "
                      f"{RunDir(result.run_dir).resume_command()}")
        return
    if result.dropped:
        console.print(f"[yellow]{result.dropped} records longer than the context were left out[/yellow]")
    console.print(f"val loss by epoch: {', '.join(f'{v:.4f}' for v in result.val_losses)} (base model "
                  f"{result.base_val_loss:.4f}); best epoch {result.best_epoch} is the `best` checkpoint")
    console.print(f"run: {result.run_dir}")
    console.print(f"loss plot: {result.loss_plot}")
    console.print(f'ask it: lmlab sample {result.run_dir} --instruction "..." [--input "..."]')


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config, or resume a run")
    p.add_argument("config", nargs="?", help="TOML preset, e.g. configs/shakespeare-char-cpu.toml")
    add_set(p)
    p.add_argument("--run", type=destination("--run", "run"), help="run dir (default: runs/<config name>)")
    p.add_argument("--budget", metavar="30s|5m|2h", help="end the run, start-up and evals included, after this "
                   "long (at most 366 days): its steps are timed and max_iters set to fill it (sets "
                   "train.budget_seconds)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    add_device(p, " (may differ from the original on resume)")
    p.add_argument("--init-from", metavar="RUN[:CHECKPOINT]", help="start a new run from another run's weights "
                   "(CHECKPOINT: best, latest (the default), step_N or N)")
    p.add_argument("--keep-optimizer", action="store_true", help="with --init-from: carry the optimizer state too")
    p.add_argument("--force", action="store_true", help="resume even though the dataset's content changed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="instruction-tune a run on Alpaca-format records (loss on responses only)")
    p.add_argument("base", metavar="RUN", help="the run whose best checkpoint is fine-tuned")
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="TOML file with a [finetune] section "
                   "(epochs, learning_rate, batch_size, val_fraction, seed, data)")
    p.add_argument("--data", help="JSON list of {instruction, input, output} records (sets finetune.data)")
    add_set(p, "finetune.epochs=5")
    p.add_argument("--out", type=destination("--out", "run"), help="the new run dir (default: runs/<RUN name>-<data "
                   "name>)")
    p.add_argument("--run", type=destination("--run", "run"), help=argparse.SUPPRESS)  # --out's old spelling
    add_device(p)
    p.set_defaults(func=cmd_finetune)
