"""`lmlab eval` (loss, perplexity, accuracy, bits per byte on a val split) and `lmlab sample`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    print_table,
    sampling,
    ticking,
)
from lmlab.config import checkpoint_label
from lmlab.errors import UserError
from lmlab.fileio import WriteError, atomic_write_text

if TYPE_CHECKING:
    from lmlab.rundir import LoadedRun


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task:
        return cmd_eval_tasks(args)
    for option in ("limit", "samples"):
        if getattr(args, option) is not None:
            raise UserError(f"--{option} goes with --task; the val split is cut with --max-tokens N.")
    from lmlab.evaluate import evaluate_run

    run = load_run(args.run, args.checkpoint, args.device)
    subset = f" (about {args.max_tokens:,} tokens of it: --max-tokens)" if args.max_tokens else ""
    with ticking("window", f"Evaluating the val split{subset}", stderr=args.json) as tick:
        result = evaluate_run(run, args.dataset and Path(args.dataset), args.batch_size, tick,
                              max_tokens=args.max_tokens)
    not_kept = result.pop("not_kept", None)
    if not_kept:
        print(f"note: the result is not kept in the run: {not_kept}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({checkpoint_label(run.checkpoint, run.step)}) on {result['dataset']} val")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)
    if args.max_tokens:
        console.print(f"A subset: {result['windows']:,} of the split's {result['split_windows']:,} windows of "
                      f"{run.config.model.block_size:,} tokens, spread evenly over it ({result['tokens']:,} of "
                      f"{result['split_tokens']:,} tokens); kept apart from whole-split results.")


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from lmlab.tasks import evaluate_task, load_task

    for option, why in (("max_tokens", "cuts the val split"), ("dataset", "names the val split's dataset")):
        if getattr(args, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} {why}, which --task does not score; leave it out "
                            "(--limit N scores a task's first N items).")
    if args.samples and len(args.task) > 1:
        raise UserError("--samples writes the items of one task; pass one --task with it.")
    tasks = [load_task(source, args.limit) for source in args.task]  # every file checked before the model loads
    run = load_run(args.run, args.checkpoint, args.device)
    results = []
    for task in tasks:
        with ticking("choice", f"Scoring {task.name} ({len(task.items):,} items)", stderr=args.json) as tick:
            results.append(evaluate_task(run, task, args.limit, progress=tick))
    if args.samples:
        atomic_write_text(Path(args.samples), "".join(json.dumps(s) + "\n" for s in results[0].samples()))
    if args.json:
        print(json.dumps({"tasks": [r.summary for r in results]}))
        return
    print_task_results(f"{args.run} ({checkpoint_label(run.checkpoint, run.step)}), log-likelihoods in float32",
                       [r.summary for r in results])
    if args.samples:
        console.print(f"per-item log-likelihoods: {args.samples}")


def print_task_results(title: str, results: list[dict[str, Any]]) -> None:
    """The scores of each task (acc and acc_norm with their standard errors, beside chance), then what was left
    out or cut, in a sentence per task."""
    from lmlab.runs import TASK_RESULT_COLUMNS

    print_table(title, TASK_RESULT_COLUMNS, results)
    for r in results:
        for note in task_notes(r):
            console.print(f"{r['task']}: {note}", highlight=False)


def task_notes(result: dict[str, Any]) -> list[str]:
    """What a task result leaves out or cuts, in sentences."""
    notes = []
    if result["skipped_unseen"]:
        notes.append(f"{result['skipped_unseen']:,} item(s) skipped: their text has characters the run's char "
                     f"tokenizer never saw ({result['unseen']!r}).")
    if result["skipped_long"]:
        notes.append(f"{result['skipped_long']:,} item(s) skipped: a choice is longer than the model's context window.")
    if result["truncated"]:
        notes.append(f"{result['truncated']:,} item(s) longer than the context window: the context of a choice that "
                     "does not fit was cut from the left, as lm-evaluation-harness does.")
    return notes


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
    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run, or its scores on "
                       "multiple-choice tasks (--task)")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    p.add_argument("--max-tokens", type=count(), help="score about N tokens of the val split, in whole windows "
                   "spread evenly over it (kept apart from whole-split results)")
    p.add_argument("--task", action="append", metavar="FILE", help="score a multiple-choice task instead of the "
                   "val split: JSON lines in HellaSwag's layout or {context, choices, answer}, or "
                   "hf:OWNER/NAME[:SPLIT] (repeatable; README: Evaluating)")
    p.add_argument("--limit", type=count(), help="with --task: score only the first N items of each task")
    p.add_argument("--samples", metavar="OUT.jsonl", help="with --task: write each item's log-likelihoods and picks")
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
