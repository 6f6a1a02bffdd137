"""`lmlab import-hf` and `lmlab export-hf`: Hugging Face GPT-2, Llama, Qwen2 and Qwen3 folders in and out;
`lmlab export-gguf`: a run as one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.api.loading import note_checkpoint
from lmlab.commands.common import add_checkpoint, console, count, destination, ticking
from lmlab.core.config import checkpoint_label
from lmlab.core.fileio import human_bytes

ARCHS = ("auto", "gpt2", "llama", "qwen2", "qwen3")  # lmlab.hf.ARCHS, named here so --help does not import torch
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # lmlab.gguf.tensors.TYPES, named here for the same reason


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


def cmd_export_gguf(args: argparse.Namespace) -> None:
    # First: without the gguf package (the GGML project's writer, an extra) this import fails before anything is
    # read, and `main` says which extra to install.
    from lmlab.gguf import export_gguf

    with ticking("tensor", f"Writing {args.out}") as tick:
        result = export_gguf(Path(args.run), Path(args.out), args.checkpoint, args.type, tick)
    note_checkpoint(args.run, args.checkpoint, result["checkpoint"], result["step"])
    label = checkpoint_label(result["checkpoint"], result["step"])
    out = Path(result["out"])
    console.print(f"wrote {out} ({result['arch']}, {result['type']}, {human_bytes(result['bytes'])}, {label}; "
                  f"tokenizer {result['tokenizer']}) and its model card {out.with_suffix('.md')}; run it with "
                  f"llama-cli -m {out}", highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (config.json + "
                       "safetensors) into a run")
    p.add_argument("dir", help="folder with config.json, model.safetensors (or its shards) and tokenizer files")
    p.add_argument("--out", required=True, type=destination("--out", "run"), help="the new run dir, e.g. runs/smollm2")
    p.add_argument("--tokenizer", metavar="DIR_OR_FILE", help="the model's tokenizer when DIR has none: a folder "
                   "with tokenizer.json (or vocab.json + merges.txt), or the tokenizer.json itself")
    p.add_argument("--block-size", type=count(), help="a shorter context than the model's (its "
                   "max_position_embeddings), e.g. to train and sample with less memory")

    p = sub.add_parser("export-hf", help="write a run as a Hugging Face folder (GPT-2, Llama, Qwen2 or Qwen3)")
    p.add_argument("run", metavar="RUN", help="the run dir to export")
    p.add_argument("out", type=destination("OUT"),
                   help="new folder for config.json, model.safetensors and the tokenizer files")
    p.add_argument("--arch", choices=ARCHS, default="auto", help="the family to write; auto: gpt2 for GPT-2's "
                   "options, llama for rope + rmsnorm + swiglu, qwen2 with biases on q, k and v alone, qwen3 with "
                   "qk_norm")
    add_checkpoint(p)

    p = sub.add_parser("export-gguf", help="write a run as one GGUF file for llama.cpp, Ollama and LM Studio, with a "
                       "model card beside it")
    p.add_argument("run", metavar="RUN", help="the run dir to export")
    p.add_argument("out", metavar="OUT.gguf", type=destination("OUT", "file"),
                   help="the new file; NAME.md (the model card) and NAME.Modelfile (Ollama's) go beside it")
    p.add_argument("--type", choices=GGUF_TYPES, default="f32", help="the weights' precision: f32 (exactly the "
                   "model), f16, bf16, or q8_0 (8-bit blocks, a quarter of f32's size); norms and biases stay f32")
    add_checkpoint(p)
