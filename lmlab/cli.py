"""`lmlab` command line: each subcommand parses its arguments, calls the library and prints the result."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.errors import UserError

console = Console()


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmlab.data.prepare import prepare

    with console.status("Reading, splitting and tokenizing the corpus..."):
        target, meta, built = prepare(args.source, args.tokenizer, args.name, Path(args.out_dir),
                                      args.val_fraction, args.force)
    table = Table(title=f"{target} ({'written' if built else 'already up to date'})")
    for column in ("split", "documents", "characters", "tokens", "chars/token"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("train", "val"):
        s = meta[split]
        table.add_row(split, f"{s['documents']:,}", f"{s['characters']:,}", f"{s['tokens']:,}",
                      f"{s['characters'] / s['tokens']:.2f}")
    console.print(table)
    console.print(f"tokenizer {meta['tokenizer']}: vocab size {meta['vocab_size']:,}, stored as {meta['dtype']}")


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.config import load_config
    from lmlab.train.loop import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_config(run_dir / "config.toml", args.set) if (run_dir / "config.toml").exists() else None
        if cfg is None:
            raise UserError(f"{run_dir} is not an lmlab run (no config.toml); pass the run dir to resume.")
    elif args.config:
        cfg = load_config(Path(args.config), args.set)
        run_dir = Path(args.run or Path("runs") / Path(args.config).stem)
    else:
        raise UserError("lmlab train needs a CONFIG.toml, or --resume RUN to continue a run.")
    trainer = Trainer(cfg, run_dir, args.device, resume=bool(args.resume), console=console)
    _copy_tokenizer(trainer)
    m = trainer.model
    console.print(f"model: {m.num_params() / 1e6:.2f}M parameters ({m.num_params(False) / 1e6:.2f}M without "
                  f"embeddings) | device {trainer.device} | {str(trainer.dtype).removeprefix('torch.')}")
    result = trainer.run()
    if result.stopped_early:
        console.print(f"stopped early at step {result.steps}: no new best val loss in {cfg.train.patience} evals")
    console.print(f"best val loss {result.best_val_loss:.4f} at step {result.best_step}")
    console.print(f"run: {result.run_dir}")
    console.print(f"loss plot: {result.loss_plot}")


def _copy_tokenizer(trainer) -> None:
    """A run keeps its tokenizer and dataset facts, so sampling works after the dataset dir is gone."""
    from lmlab.fileio import atomic_write_text

    dataset = Path(trainer.cfg.data.dataset)
    shutil.copyfile(dataset / "tokenizer.json", trainer.run_dir / "tokenizer.json")
    atomic_write_text(trainer.run_dir / "dataset.json", json.dumps(trainer.meta, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.data.loader import open_tokens
    from lmlab.data.prepare import read_meta
    from lmlab.device import autocast_dtype, resolve_device
    from lmlab.evaluate import evaluate_split
    from lmlab.runs import load_run_model

    device = resolve_device(args.device)
    model, cfg, state = load_run_model(Path(args.run), args.checkpoint, device)
    dataset = Path(args.dataset or cfg.data.dataset)
    meta = read_meta(dataset)
    run_meta = json.loads((Path(args.run) / "dataset.json").read_text())
    if meta["tokenizer_sha256"] != run_meta["tokenizer_sha256"]:
        raise UserError(f"dataset {dataset} was tokenized with a different tokenizer than run {args.run}; "
                        "prepare it with the run's tokenizer.")
    tokens = open_tokens(dataset, "val", meta["dtype"])
    dtype = autocast_dtype(device, cfg.train.dtype)
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    with console.status("Evaluating the val split...") as status:
        result = evaluate_split(model, tokens, bytes_per_token, args.batch_size, device, dtype,
                                lambda done, total: status.update(f"Evaluating the val split: {done}/{total} batches"))
    result = {"run": args.run, "checkpoint": args.checkpoint, "step": state["step"], "dataset": str(dataset),
              **result}
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"{args.run} ({args.checkpoint}, step {state['step']}) on {dataset} val")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte", "tokens"):
        table.add_row(key.replace("_", " "), f"{result[key]:,}" if key == "tokens" else f"{result[key]:.4f}")
    console.print(table)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmlab.data.tokenizers import Tokenizer
    from lmlab.device import autocast_dtype, resolve_device
    from lmlab.generate import generate
    from lmlab.runs import load_run_model

    run = Path(args.run)
    device = resolve_device(args.device)
    model, cfg, state = load_run_model(run, args.checkpoint, device)
    meta = json.loads((run / "dataset.json").read_text())
    tokenizer = Tokenizer.load(run / "tokenizer.json", meta["tokenizer"])
    tokenizer.check(args.prompt, "--prompt")
    # With no prompt, start where a document starts: after an end-of-text token, or a blank line for char.
    start = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot_id] if tokenizer.eot_id is not None \
        else tokenizer.encode("\n")
    out = generate(model, start, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   autocast_dtype(device, cfg.train.dtype))
    text = args.prompt + tokenizer.decode(out)
    print(text)
    header = (f"--- checkpoint {args.checkpoint} (step {state['step']}), seed {args.seed}, temperature "
              f"{args.temperature}, top_k {args.top_k}, prompt {args.prompt!r}\n")
    with open(run / "samples.txt", "a", encoding="utf-8") as f:
        f.write(header + text + "\n\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Train GPT-style language models from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into a dataset dir (train.bin, val.bin, meta.json)")
    p.add_argument("source", nargs="+", help="`shakespeare`, or .txt/.jsonl files or folders of them")
    p.add_argument("--tokenizer", required=True, help="char, word:N or bpe:N")
    p.add_argument("--name", help="dataset name (default: the corpus name); the dir is NAME-SPEC")
    p.add_argument("--out-dir", default="data", help="where dataset dirs go (default: data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of characters held out (default 0.1)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset made from other inputs")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model from a TOML config, or resume a run")
    p.add_argument("config", nargs="?", help="TOML preset, e.g. configs/shakespeare-char-cpu.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--run", help="run dir (default: runs/<config name>)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="val loss, perplexity, accuracy and bits per byte of a run")
    p.add_argument("run")
    p.add_argument("--dataset", help="dataset dir (default: the run's); must share the run's tokenizer")
    p.add_argument("--checkpoint", default="best", help="best or latest")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K likeliest tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--checkpoint", default="best", help="best or latest")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
