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
    samplings,
)
from lmlab.config import SamplingParams
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
    params = samplings(args)
    if len(args.runs) > 1 or args.prompts or len(params) > 1:
        return _sample_grid(args, params)
    for option, value in (("--json", args.json), ("--out", args.out)):
        if value:
            raise UserError(f"{option} goes with a prompt grid (several runs, --prompts FILE or several temperatures).")
    asked = [name for name, value in (("--instruction", args.instruction), ("--chat", args.chat)) if value is not None]
    if len(asked) > 1 or (asked and args.prompt):
        raise UserError(f"{' and '.join(asked + (['--prompt'] if args.prompt else []))} ask in different ways; "
                        "give one of them.")
    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction; pass the instruction too.")
    if args.system is not None and args.chat is None:
        raise UserError("--system goes with --chat; pass the user's message too.")
    if args.num_samples > 1 and asked:
        raise UserError(f"--num-samples draws continuations of --prompt; ask {asked[0]} one answer at a time.")
    _sample_one(args, params[0])


def _sample_one(args: argparse.Namespace, params: SamplingParams) -> None:
    from lmlab.generate import chat_stream, instruct_stream, sample_stream, samples, seeded

    run = load_run(args.runs[0], args.checkpoint, args.device)
    step = compiled_step(args, run.model, args.num_samples, run.dtype)
    if args.num_samples > 1:
        texts = samples(run, args.prompt, params, args.num_samples, step)
        for i, (text, drawn) in enumerate(zip(texts, seeded(params, len(texts)))):
            print(f"--- sample {i + 1} of {len(texts)} (seed {drawn.seed})")
            print(text)
            run.run.add_sample(text, run.checkpoint, run.step, f"{drawn.describe()}, prompt {args.prompt!r}")
        return
    if args.chat is not None:
        turns = [("system", args.system)] * (args.system is not None) + [("user", args.chat)]
        pieces, asked = chat_stream(run, turns, params, step), f"chat {args.chat!r}, system {args.system!r}"
    elif args.instruction is not None:
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


def _sample_grid(args: argparse.Namespace, params: list[SamplingParams]) -> None:
    from lmlab.document import to_markdown
    from lmlab.fileio import atomic_write_text
    from lmlab.grid import read_prompts, sample_grid

    for option, given in (("--instruction", args.instruction), ("--chat", args.chat), ("--input", args.input),
                          ("--system", args.system)):
        if given:
            raise UserError(f"a prompt grid continues prompts; ask {option} of one run at a time.")
    if args.num_samples > 1:
        raise UserError("--num-samples draws several continuations of one prompt; a grid draws one per cell.")
    if args.prompts and args.prompt:
        raise UserError("--prompt and --prompts both name prompts; put the prompt in the file.")
    prompts = read_prompts(Path(args.prompts)) if args.prompts else [args.prompt]
    out = Path(args.out or ("prompt-grid.json" if args.json else "prompt-grid.md"))
    with console.status("Sampling...") as status:
        grid = sample_grid([Path(r) for r in args.runs], prompts, [p.temperature for p in params], params[0],
                           args.checkpoint, args.device, status.update)
    if args.json:
        text = json.dumps(grid.to_json(), indent=1, ensure_ascii=False) + "\n"
    else:
        text = to_markdown(f"Prompt grid: {', '.join(grid.runs)}", grid.blocks())
    atomic_write_text(out, text)
    sys.stdout.write(text)
    print(f"written to {out}", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run")
    p.add_argument("run", metavar="RUN", help="a run dir (trained, fine-tuned or imported)")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    add_checkpoint(p)
    p.add_argument("--batch-size", type=count(), default=32, help="windows of block_size tokens scored at once")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run, or a grid of runs x prompts x temperatures")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run dir (trained, fine-tuned or imported); several make "
                   "a grid")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--prompts", metavar="FILE", help="a grid of prompts: one per line (\\n for a line break) or a "
                   "JSON list; each run continues each at each --temperature")
    add_sampling(p, several=True)
    p.add_argument("--num-samples", type=count(), default=1,
                   help="continuations drawn in one batch, the i-th with seed SEED + i")
    add_compile(p, default=False, why="pays off for thousands of tokens")
    add_checkpoint(p)
    p.add_argument("--instruction", help="ask in the run's own format (an imported instruct model's chat template; "
                   "Alpaca unless fine-tuned otherwise) and print the answer alone")
    p.add_argument("--input", default="", help="with --instruction: the record's input")
    p.add_argument("--chat", metavar="TEXT", help="a user's message, put through an imported instruct model's chat "
                   "template (else the run's prompt format, or a role: content transcript); prints the reply")
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system message before it")
    p.add_argument("--json", action="store_true", help="a grid as one JSON object instead of Markdown")
    p.add_argument("--out", metavar="FILE", help="where a grid is written too (default: prompt-grid.md, or "
                   "prompt-grid.json with --json)")
    add_device(p)
    p.set_defaults(func=cmd_sample)
