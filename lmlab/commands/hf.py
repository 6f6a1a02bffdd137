"""`lmlab import-hf` and `lmlab export-hf`: Hugging Face GPT-2, Llama, Qwen2 and Qwen3 folders in and out."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands.common import add_checkpoint, console, count, note_checkpoint
from lmlab.core.config import checkpoint_label

ARCHS = ("auto", "gpt2", "llama", "qwen2", "qwen3")  # lmlab.hf.ARCHS, named here so --help does not import torch


def cmd_import_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import import_hf

    with console.status(f"Importing {args.dir}..."):
        result = import_hf(Path(args.dir), Path(args.out), args.tokenizer and Path(args.tokenizer), args.block_size)
    m = result["model"]
    console.print(f"imported {args.dir} ({result['family']}) into {result['run']}: {result['params'] / 1e6:.2f}M "
                  f"parameters, {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
                  f"vocab {m.vocab_size:,}; tokenizer {result['tokenizer']}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import export_hf

    with console.status(f"Exporting {args.run}..."):
        result = export_hf(Path(args.run), Path(args.out), args.checkpoint, args.arch)
    note_checkpoint(args.run, args.checkpoint, result["checkpoint"], result["step"])
    label = checkpoint_label(result["checkpoint"], result["step"])
    console.print(f"wrote {result['out']} ({result['family']}, {label}); load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({result['out']!r})")
    if result["tokenizer"] is None:
        console.print("no tokenizer files written: the run has none (it was imported without one)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (config.json + "
                       "safetensors) into a run")
    p.add_argument("dir", help="folder with config.json, model.safetensors (or its shards) and tokenizer files")
    p.add_argument("--out", required=True, help="the new run dir, e.g. runs/smollm2")
    p.add_argument("--tokenizer", metavar="DIR_OR_FILE", help="the model's tokenizer when DIR has none: a folder "
                   "with tokenizer.json (or vocab.json + merges.txt), or the tokenizer.json itself")
    p.add_argument("--block-size", type=count(), help="a shorter context than the model's (its "
                   "max_position_embeddings), e.g. to train and sample with less memory")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a run as a Hugging Face folder (GPT-2, Llama, Qwen2 or Qwen3)")
    p.add_argument("run", metavar="RUN", help="the run dir to export")
    p.add_argument("out", help="new folder for config.json, model.safetensors and the tokenizer files")
    p.add_argument("--arch", choices=ARCHS, default="auto", help="the family to write; auto: gpt2 for GPT-2's "
                   "options, llama for rope + rmsnorm + swiglu, qwen2 with qkv_bias too, qwen3 with qk_norm")
    add_checkpoint(p)
    p.set_defaults(func=cmd_export_hf)
