"""`lmlab eval` (loss, perplexity, accuracy, bits per byte on a val split) and `lmlab sample`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
from lmlab.fileio import WriteError

if TYPE_CHECKING:
    from lmlab.rundir import LoadedRun


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.evaluate import evaluate_run

    run = load_run(args.run, args.checkpoint, args.device)
    with console.status("Evaluating the val split...") as status:
        result = evaluate_run(run, args.dataset and Path(args.dataset), args.batch_size,
                              lambda done, total: status.update(f"Evaluating the val split: {done}/{total} batches"))
    not_kept = result.pop("not_kept", None)
    if not_kept:
        print(f"note: the result is not kept in the run: {not_kept}", file=sys.stderr)
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
    tokens = max(len(args.prompt), run.config.model.block_size) + args.max_new_tokens
    step = compiled_step(args, run, args.num_samples, "--num-samples", tokens)
    if args.num_samples > 1:
        texts = samples(run, args.prompt, params, args.num_samples, step)
        for i, (text, drawn) in enumerate(zip(texts, seeded(params, len(texts)))):
            print(f"--- sample {i + 1} of {len(texts)} (seed {drawn.seed})")
            print(text)
            keep(run, text, f"{drawn.describe()}, prompt {args.prompt!r}")
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
    keep(run, "".join(text), f"{params.describe()}, {asked}")


def keep(run: LoadedRun, text: str, settings: str) -> None:
    """Append a sample to the run's samples.txt; one that cannot be written (a run folder read-only to this user)
    is only noted: the sample was printed."""
    try:
        run.run.add_sample(text, run.checkpoint, run.step, settings)
    except WriteError as err:
        print(f"note: the sample is not kept in the run: {err.path} ({err.reason}); {err.fix} to keep the next.",
              file=sys.stderr)


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
