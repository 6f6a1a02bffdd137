"""`lmlab eval` (loss, perplexity, accuracy, bits per byte on a val split) and `lmlab sample`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import (
    add_checkpoint,
    add_compile,
    add_device,
    add_sampling,
    compiled_step,
    console,
    count,
    load_run,
    sampling,
)
from lmlab.errors import UserError


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.evaluate import evaluate_run

    run = load_run(args.run, args.checkpoint, args.device)
    with console.status("Evaluating the val split...") as status:
        result = evaluate_run(run, args.dataset and Path(args.dataset), args.batch_size,
                              lambda done, total: status.update(f"Evaluating the val split: {done}/{total} batches"))
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({run.checkpoint}, step {result['step']}) on {result['dataset']} val")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmlab.generate import instruct_stream, sample_stream, samples, seeded

    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction; pass the instruction too.")
    if args.num_samples > 1 and args.instruction is not None:
        raise UserError("--num-samples draws continuations of --prompt; ask an --instruction one answer at a time.")
    params = sampling(args)
    run = load_run(args.run, args.checkpoint, args.device)
    step = compiled_step(args, run.model, args.num_samples, run.dtype)
    if args.num_samples > 1:
        texts = samples(run, args.prompt, params, args.num_samples, step)
        for i, (text, drawn) in enumerate(zip(texts, seeded(params, len(texts)))):
            print(f"--- sample {i + 1} of {len(texts)} (seed {drawn.seed})")
            print(text)
            run.run.add_sample(text, run.checkpoint, run.step, f"{drawn.describe()}, prompt {args.prompt!r}")
        return
    if args.instruction is not None:
        pieces = instruct_stream(run, args.instruction, args.input, params, step)
        asked = f"instruction {args.instruction!r}, input {args.input!r}"
    else:
        pieces, asked = sample_stream(run, args.prompt, params, step), f"prompt {args.prompt!r}"
    text = []
    for piece in pieces:  # printed as it is generated, as `serve` streams it
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    print()
    run.run.add_sample("".join(text), run.checkpoint, run.step, f"{params.describe()}, {asked}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    add_checkpoint(p)
    p.add_argument("--batch-size", type=count(), default=32, help="windows of block_size tokens scored at once")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    add_sampling(p)
    p.add_argument("--num-samples", type=count(), default=1,
                   help="continuations drawn in one batch, the i-th with seed SEED + i")
    add_compile(p, default=False, why="pays off for thousands of tokens")
    add_checkpoint(p)
    p.add_argument("--instruction", help="ask in the run's prompt format (Alpaca unless fine-tuned otherwise) "
                   "and print the answer alone")
    p.add_argument("--input", default="", help="with --instruction: the record's input")
    add_device(p)
    p.set_defaults(func=cmd_sample)
