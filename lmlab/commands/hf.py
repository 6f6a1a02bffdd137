"""`lmlab import-hf` and `lmlab export-hf`: Hugging Face GPT-2 checkpoints in and out."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands.common import add_checkpoint, console, note_checkpoint


def cmd_import_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import import_hf

    with console.status(f"Importing {args.dir}..."):
        result = import_hf(Path(args.dir), Path(args.out))
    m = result["model"]
    console.print(f"imported {args.dir} into {result['run']}: {result['params'] / 1e6:.2f}M parameters, "
                  f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, vocab "
                  f"{m.vocab_size:,}; tokenizer {result['tokenizer'] or 'none (the folder has no tokenizer files)'}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lmlab.hf import export_hf

    with console.status(f"Exporting {args.run}..."):
        result = export_hf(Path(args.run), Path(args.out), args.checkpoint)
    note_checkpoint(args.run, args.checkpoint, result["checkpoint"], result["step"])
    console.print(f"wrote {result['out']} (checkpoint {result['checkpoint']}, step {result['step']}); load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({result['out']!r})")
    if result["tokenizer_skipped"]:
        console.print(f"no tokenizer files written: {result['tokenizer_skipped']}, which GPT-2's tokenizer "
                      "classes cannot load")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2 folder (config.json + model.safetensors) "
                       "into a run")
    p.add_argument("dir", help="folder with config.json, model.safetensors and optionally tokenizer files")
    p.add_argument("--out", required=True, help="the new run dir, e.g. runs/gpt2")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a GPT-2-architecture run as a Hugging Face folder")
    p.add_argument("run")
    p.add_argument("out", help="new folder for config.json, model.safetensors and tokenizer files")
    add_checkpoint(p)
    p.set_defaults(func=cmd_export_hf)
