"""`lmlab eval` (loss, perplexity, accuracy, bits per byte on a val split) and `lmlab sample`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import (
    add_checkpoint,
    add_compile,
    add_device,
    add_sampling,
    compiled_step,
    console,
    positive,
    sampling,
)
from lmlab.errors import UserError


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.evaluate import evaluate_run
    from lmlab.rundir import RunDir

    run = RunDir(args.run).load(args.checkpoint, args.device)
    with console.status("Evaluating the val split...") as status:
        result = evaluate_run(run, args.dataset and Path(args.dataset), args.batch_size,
                              lambda done, total: status.update(f"Evaluating the val split: {done}/{total} batches"))
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({args.checkpoint}, step {result['step']}) on {result['dataset']} val")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmlab.generate import instruct_all, samples, seeded
    from lmlab.rundir import RunDir

    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction; pass the instruction too.")
    positive(args, "num_samples")
    if args.num_samples > 1 and args.instruction is not None:
        raise UserError("--num-samples draws continuations of --prompt; ask an --instruction one answer at a time.")
    params = sampling(args)
    run = RunDir(args.run).load(args.checkpoint, args.device)
    step = compiled_step(args, run.model, args.num_samples, run.dtype)
    if args.instruction is not None:
        texts = instruct_all(run, [(args.instruction, args.input)], params, step=step)
        asked = f"instruction {args.instruction!r}, input {args.input!r}"
    else:
        texts, asked = samples(run, args.prompt, params, args.num_samples, step), f"prompt {args.prompt!r}"
    for i, (text, drawn) in enumerate(zip(texts, seeded(params, len(texts)))):
        if len(texts) > 1:
            print(f"--- sample {i + 1} of {len(texts)} (seed {drawn.seed})")
        print(text)
        run.run.add_sample(text, args.checkpoint, run.step, f"{drawn.describe()}, {asked}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    add_checkpoint(p)
    p.add_argument("--batch-size", type=int, default=32, help="windows of block_size tokens scored at once")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    add_sampling(p)
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations drawn in one batch, the i-th with seed SEED + i")
    add_compile(p, default=False, why="pays off for thousands of tokens")
    add_checkpoint(p)
    p.add_argument("--instruction", help="ask in the run's prompt format (Alpaca unless fine-tuned otherwise) "
                   "and print the answer alone")
    p.add_argument("--input", default="", help="with --instruction: the record's input")
    add_device(p)
    p.set_defaults(func=cmd_sample)
