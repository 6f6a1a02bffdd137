"""`lmlab train` (a new run, a resumed one, or one started from another's weights: `lmlab.train`) and
`lmlab finetune`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmlab.commands.common import add_device, add_set, add_size, check_destination, console, destination
from lmlab.core.errors import UserError


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.core.busy import process_age

    started = time.perf_counter() - process_age()  # a --budget counts from the process's start
    from lmlab.api.training import train

    train(args.config, run=args.run, resume=args.resume, budget=args.budget, device=args.device,
          init_from=args.init_from, keep_optimizer=args.keep_optimizer, force=args.force, set=args.set,
          console=console, started=started, size=args.size)


def cmd_finetune(args: argparse.Namespace) -> None:
    import dataclasses

    from lmlab.core.config_toml import load_finetune_config
    from lmlab.run.rundir import RunDir
    from lmlab.train.finetune import finetune
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
        how = (f"during a step, which was abandoned (a step that fails once a stop signal came, or still runs "
               f"{STOP_GRACE:g} s after it, is given up)" if result.abandoned else
               "after a step, and a checkpoint was written")
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
    add_size(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    add_device(p, " (may differ from the original on resume)")
    p.add_argument("--init-from", metavar="RUN[:CHECKPOINT]", help="start a new run from another run's weights "
                   "(CHECKPOINT: best, latest (the default), step_N or N)")
    p.add_argument("--keep-optimizer", action="store_true", help="with --init-from: carry the optimizer state too")
    p.add_argument("--force", action="store_true", help="resume even though the dataset's content changed")

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
