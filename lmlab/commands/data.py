"""`lmlab prepare` (`lmlab.prepare`) and `lmlab data stats`: corpus to dataset dir, and what a dataset holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from lmlab.commands.common import console, count, destination
from lmlab.data.tokenizers import named_kinds


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmlab.api.data import prepare

    dataset = prepare(args.source, args.tokenizer, name=args.name, out_dir=args.out_dir,
                      val_fraction=args.val_fraction, val_tokens=args.val_tokens, max_tokens=args.max_tokens,
                      pack=args.pack, block_size=args.block_size, shard_tokens=args.shard_tokens,
                      text_field=args.text_field, workers=args.workers, gpt2_dir=args.gpt2_dir,
                      normalize=args.normalize, keep_chars=args.keep_chars, drop_chars=args.drop_chars,
                      force=args.force, console=console)
    target, meta, built = dataset.path, dataset.meta, dataset.built
    table = Table(title=f"{target} ({'written' if built else 'already up to date'})")
    for column in ("split", "documents", "characters", "tokens", "chars/token"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("train", "val"):
        s = meta[split]
        table.add_row(split, f"{s['documents']:,}", f"{s['characters']:,}", f"{s['tokens']:,}",
                      f"{s['characters'] / s['tokens']:.2f}")
    console.print(table)
    console.print(f"tokenizer {meta['tokenizer']}: vocab size {meta['vocab_size']:,}, stored as {meta['dtype']}")
    if dataset.normalized:
        console.print(f"normalised ({dataset.normalized}): prompts, tasks and requests to its runs are too")
    _print_stats(dataset.stats(args.block_size))


def _print_stats(s: dict[str, Any]) -> None:
    table = Table(title=f"{s['dataset']}: {s['tokenizer']}, pack {s['pack']}", show_header=False)
    table.add_row("documents", f"{s['documents']:,}")
    table.add_row("tokens", f"{s['tokens']:,} in {s['shards']['train']} train + {s['shards']['val']} val shards")
    table.add_row("characters per token", f"{s['chars_per_token']:.2f}")
    if s["lengths"] is None:
        table.add_row("tokens per document", "not recorded: a char dataset has no end-of-text token between documents")
    else:
        cropped = " (as cropped)" if "row_length" in s else ""
        table.add_row(f"tokens per document{cropped}", f"mean {s['mean']:,.1f}, median {s['median']:,.0f}, p90 "
                      f"{s['p90']:,.0f}, p99 {s['p99']:,.0f}, max {s['max']:,}")
        if "row_length" in s:  # every row is at most the context by design: what was cut is what counts
            table.add_row(f"cut to a row of {s['row_length']} tokens", f"{100 * s['share_documents_cropped']:.1f}% "
                          f"of documents, losing {s['lost_tokens']:,} tokens ({100 * s['share_tokens_lost']:.1f}%)")
        else:
            table.add_row(f"beyond the context length {s['block_size']}",
                          f"{100 * s['share_documents_beyond']:.1f}% of documents, "
                          f"{100 * s['share_tokens_beyond']:.1f}% of tokens")
    if "share_padding" in s:
        table.add_row("padding in the rows", f"{100 * s['share_padding']:.1f}% of the stored ids")
    console.print(table)
    for line in s["landing"]:
        console.print(line, highlight=False)


def cmd_data_stats(args: argparse.Namespace) -> None:
    from lmlab.analysis.plots import plot_document_lengths
    from lmlab.data.stats import dataset_stats

    stats = dataset_stats(Path(args.dataset), args.block_size)
    _print_stats(stats)
    if stats["lengths"] is not None:
        plot = plot_document_lengths(stats["lengths"], stats["block_size"], Path(args.dataset) / "doc_lengths.png")
        console.print(f"histogram: {plot}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into a dataset dir (token shards, tokenizer, meta.json)")
    p.add_argument("source", nargs="+", help="`shakespeare`, hf:OWNER/NAME[:CONFIG], or .txt/.jsonl/.jsonl.gz/"
                   ".parquet files or folders of them")
    p.add_argument("--tokenizer", required=True,
                   help=f"{named_kinds()} (e.g. bpe:4096, tiktoken:gpt2; gpt2 reads local files), or the folder "
                   "of a tokenizer to use as it is: a Hugging Face model, an lmlab run or dataset (a path with /)")
    p.add_argument("--gpt2-dir", help="with --tokenizer gpt2: folder with GPT-2's tokenizer.json, or vocab.json + "
                   "merges.txt (default: $LMLAB_GPT2_DIR)")
    p.add_argument("--name", help="dataset name (default: the corpus name); the dir is NAME-SPEC")
    p.add_argument("--out-dir", default="data", type=destination("--out-dir"),
                   help="where dataset dirs go (default: data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of characters held out (default 0.1)")
    p.add_argument("--val-tokens", type=int, help="size the val split in tokens (documents in sha256-of-name order)")
    p.add_argument("--max-tokens", type=int, help="stop after this many train tokens (at a document boundary)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet/hf: sources")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument("--pack", choices=["concat", "crop"], default="concat",
                   help="concat: documents joined by end-of-text (default); crop: one row per document, cut to "
                   "--block-size + 1 tokens and padded with end-of-text (train with model.block_size = --block-size)")
    p.add_argument("--block-size", type=int, default=1024, help="context length for --pack crop and the stats "
                   "(default 1024)")
    p.add_argument("--normalize", action="append", metavar="lower|nfkc|ascii",
                   help="normalise the text first: lower-case, NFKC, fold to ASCII; combinable (nfkc,lower or the "
                   "option again), applied nfkc, ascii, lower whatever the order; kept in the tokenizer, so text "
                   "sampled, evaluated or served later is normalised the same way")
    chars = p.add_mutually_exclusive_group()
    chars.add_argument("--keep-chars", metavar="CHARS", help="keep only these characters (after --normalize), e.g. "
                       "'a-z \\n': ranges, and \\n \\t \\s (space) \\\\ \\- escapes; a char dataset must keep \\n")
    chars.add_argument("--drop-chars", metavar="CHARS", help="remove these characters (after --normalize), written "
                       "as for --keep-chars")
    p.add_argument("--force", action="store_true", help="replace an existing dataset made from other inputs")

    p = sub.add_parser("data", help="inspect a prepared dataset")
    data = p.add_subparsers(dest="data_command", required=True, help="what to inspect")
    p = data.add_parser("stats", help="documents, tokens, document lengths against the context, a histogram PNG")
    p.add_argument("dataset", help="a dataset dir made by `lmlab prepare`")
    p.add_argument("--block-size", type=count(),
                   help="context length to compare with (default: the dataset's, or 1024)")
