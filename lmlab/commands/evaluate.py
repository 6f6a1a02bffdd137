"""`lmlab eval` (loss, perplexity, accuracy, bits per byte on a val split: `lmlab.Run.eval`; or task scores) and
`lmlab sample` (one run: `lmlab.Run.sample` and its kin; or a grid)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.commands.common import (
    add_checkpoint,
    add_compile,
    add_device,
    add_sampling,
    check_destination,
    console,
    count,
    destination,
    print_table,
    samplings,
    terminating,
    ticking,
)
from lmlab.core.config import SamplingParams, checkpoint_label
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task:
        return cmd_eval_tasks(args)
    for option in ("limit", "samples"):
        if getattr(args, option) is not None:
            raise UserError(f"--{option} goes with --task; the val split is cut with --max-tokens N.")
    from lmlab.api.run import Run

    run = Run(args.run, Console(stderr=True) if args.json else console)
    result = run.eval(args.checkpoint, dataset=args.dataset, max_tokens=args.max_tokens,
                      batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({checkpoint_label(result['checkpoint'], result['step'])}) on "
                        f"{result['dataset']} val")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)
    if args.max_tokens:
        # A result kept before evaluations said their standard error has none.
        error = f", the loss with a standard error of {result['stderr']:.4f}" if "stderr" in result else ""
        console.print(f"A subset: {result['windows']:,} of the split's {result['split_windows']:,} windows of "
                      f"{run.config.model.block_size:,} tokens, spread evenly over it ({result['tokens']:,} of "
                      f"{result['split_tokens']:,} tokens){error}; kept apart from whole-split results.")


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from lmlab.analysis.columns import TASK_RESULT_COLUMNS
    from lmlab.api.run import used_run
    from lmlab.evals.tasks import ITEM_NOTES, evaluate_task, load_task

    for option, why in (("max_tokens", "cuts the val split"), ("dataset", "names the val split's dataset")):
        if getattr(args, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} {why}, which --task does not score; leave it out "
                            "(--limit N scores a task's first N items).")
    if args.samples and len(args.task) > 1:
        raise UserError("--samples writes the items of one task; pass one --task with it.")
    tasks = [load_task(source, args.limit) for source in args.task]  # every file checked before the model loads
    run, notes = used_run(args.run, args.checkpoint, args.device, "scored")
    results = []
    for task in tasks:
        with ticking("choice", f"Scoring {task.name} ({len(task.items):,} items)", stderr=args.json) as tick:
            results.append(evaluate_task(run, task, args.limit, progress=tick))
    notes.flush()
    if args.samples:
        atomic_write_text(Path(args.samples), "".join(json.dumps(s) + "\n" for s in results[0].samples))
    if args.json:
        print(json.dumps({"tasks": [r.summary for r in results]}))
        return
    # The scores of each task (acc and acc_norm with their standard errors, beside chance), then what was left out
    # or cut, in a sentence per task.
    print_table(f"{args.run} ({checkpoint_label(run.checkpoint, run.step)}), log-likelihoods in float32",
                TASK_RESULT_COLUMNS, [r.summary for r in results])
    for r in results:
        for key, note in ITEM_NOTES.items():
            if r.summary[key]:
                console.print(f"{r.summary['task']}: {r.summary[key]:,} {note.format(**r.summary)}.", highlight=False)
    if args.samples:
        console.print(f"per-item log-likelihoods: {args.samples}")


def cmd_sample(args: argparse.Namespace) -> None:
    params = samplings(args)
    if len(args.runs) > 1 or args.prompts or len(params) > 1 or args.chat is True:
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
    from lmlab.api.run import Run
    from lmlab.core.config import seeded

    run = Run(args.runs[0], console)
    how = {"checkpoint": args.checkpoint, "device": args.device, "compile": args.compile, "quantize": args.quantize,
           **asdict(params)}
    if args.num_samples > 1:
        texts = run.samples(args.prompt, args.num_samples, **how)
        for i, (text, drawn) in enumerate(zip(texts, seeded(params, len(texts)))):
            print(f"--- sample {i + 1} of {len(texts)} (seed {drawn.seed})")
            print(text)
        return _say_speed(run.decoded)
    if args.chat is not None:
        pieces = run.chat(args.chat, system=args.system, stream=True, **how)
    elif args.instruction is not None:
        pieces = run.instruct(args.instruction, args.input, stream=True, **how)
    else:
        pieces = run.sample(args.prompt, stream=True, **how)
    for piece in pieces:  # printed as it is generated, as `serve` streams it
        print(piece, end="", flush=True)
    print()
    _say_speed(run.decoded)


def _say_speed(decoded: tuple[int, float] | None) -> None:
    """The tokens generated and their rate, on stderr: stdout is the text."""
    if decoded:
        tokens, seconds = decoded
        print(f"generated {tokens:,} tokens in {seconds:.2f} s (the prompt read first): "
              f"{tokens / max(seconds, 1e-9):,.1f} tok/s", file=sys.stderr)


def _sample_grid(args: argparse.Namespace, params: list[SamplingParams]) -> None:
    from lmlab.writeup.document import code, to_markdown
    from lmlab.writeup.grid import GridStopped, read_prompts, sample_grid

    for option, given in (("--instruction", args.instruction), ("--input", args.input), ("--system", args.system),
                          ("--quantize", args.quantize != "none")):
        if given:
            raise UserError(f"a prompt grid puts its prompts to every run (--chat: as a user's message where a run "
                            f"has a chat template or prompt format); ask {option} of one run at a time.")
    if args.num_samples > 1:
        raise UserError("--num-samples draws several continuations of one prompt; a grid draws one per cell.")
    named = [option for option, given in (("--prompt", args.prompt), ("--prompts", args.prompts),
                                          ("--chat TEXT", isinstance(args.chat, str))) if given]
    if len(named) > 1:
        raise UserError(f"{' and '.join(named)} both name prompts; put them in the --prompts file (with --chat alone "
                        "to ask them as chat).")
    if args.chat is True and not (args.prompts or len(args.runs) > 1 or len(params) > 1):
        raise UserError("--chat alone asks a grid's prompts (--prompts FILE, or several runs) as chat; give the "
                        "message of one run's chat as --chat TEXT.")
    prompts = read_prompts(Path(args.prompts)) if args.prompts else [args.chat if isinstance(args.chat, str)
                                                                      else args.prompt]
    out = check_destination(args.out or ("prompt-grid.json" if args.json else "prompt-grid.md"), "--out", "file")
    cells = f"{len(args.runs)} run(s) × {len(prompts):,} prompt(s) × {len(params)} temperature(s)"
    stopped = None
    with ticking("cell", f"Sampling {cells}", stderr=True) as tick, terminating():  # stdout is the grid's
        try:
            grid = sample_grid([Path(r) for r in args.runs], prompts, [p.temperature for p in params], params[0],
                               args.checkpoint, args.device, tick, chat=args.chat is not None)
        except GridStopped as stop:  # the cells that ended are kept, and said to be
            grid, stopped = stop.grid, stop
    if args.json:
        text = json.dumps(grid.to_json(), indent=1, ensure_ascii=False) + "\n"
    else:
        text = to_markdown(f"Prompt grid: {', '.join(map(code, grid.runs))}", grid.blocks())
    atomic_write_text(out, text)
    if stopped is not None:
        print(f"{stopped}: the {stopped.done} that ended are written to {out} (and each to its run's samples.txt)",
              file=sys.stderr)
        raise SystemExit(128 + signal.Signals[stopped.signal].value)
    sys.stdout.write(text)
    print(f"written to {out}", file=sys.stderr)


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
    p.add_argument("--samples", metavar="OUT.jsonl", type=destination("--samples", "file"),
                   help="with --task: write each item's log-likelihoods and picks")
    add_checkpoint(p)
    p.add_argument("--batch-size", type=count(), default=32, help="windows of block_size tokens scored at once")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    p = sub.add_parser("sample", help="generate text from a run, or a grid of runs x prompts x temperatures")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run dir (trained, fine-tuned or imported); several make "
                   "a grid")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--prompts", metavar="FILE", help="a grid of prompts: one per line (\\n for a line break) or a "
                   "JSON list; each run continues each at each --temperature")
    add_sampling(p, several=True)
    p.add_argument("--num-samples", type=count(), default=1,
                   help="continuations drawn in one batch, the i-th with seed SEED + i")
    add_compile(p, default=False, why="built once for a checkpoint, a minute or more, and kept on disk for the next "
                "calls; pays off for thousands of tokens")
    add_checkpoint(p)
    p.add_argument("--instruction", help="ask in the run's own format (an imported instruct model's chat template; "
                   "Alpaca unless fine-tuned otherwise) and print the answer alone")
    p.add_argument("--input", default="", help="with --instruction: the record's input")
    p.add_argument("--chat", metavar="TEXT", nargs="?", const=True,
                   help="a user's message, put through an imported instruct model's chat template (else the run's "
                   "prompt format, or a role: content transcript); prints the reply. In a grid (several runs, "
                   "--prompts), alone or with TEXT as the prompt: runs with a chat template or prompt format are "
                   "asked each prompt in it, the others continue it")
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system message before it")
    p.add_argument("--json", action="store_true", help="a grid as one JSON object instead of Markdown")
    p.add_argument("--out", metavar="FILE", type=destination("--out", "file"),
                   help="where a grid is written too (default: prompt-grid.md, or prompt-grid.json with --json)")
    add_device(p)
