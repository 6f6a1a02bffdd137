"""A run as one GGUF file, for llama.cpp and what runs on it (Ollama, LM Studio): `export_gguf`.

The file is written with the `gguf` package, the GGML project's own writer: the architecture llama.cpp computes
the run's model with (`tensors.py`: gpt2, llama, qwen2 or qwen3, the Hugging Face family `lmlab.hf` would export
it as), the tokenizer as llama.cpp's vocabulary (`vocab.py`), an imported instruct model's chat template, and the
weights at the precision asked for. It is built under a temporary name beside the destination and renamed into
place when whole, so a write that fails or is killed leaves nothing under the final name; the next export removes
what a killed one left. A model card goes beside it (`card.py`).
"""

from __future__ import annotations

import glob
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import psutil

from lmlab.core.errors import UserError
from lmlab.core.fileio import check_writable, replacing
from lmlab.gguf.card import card_paths, write_card
from lmlab.gguf.tensors import TYPES, arch_name, ggml_type, model_tensors, write_keys
from lmlab.gguf.vocab import Vocab, gguf_vocab
from lmlab.hf import choose_family
from lmlab.hf.family import Family
from lmlab.model.gpt import GPT
from lmlab.run.rundir import LoadedRun, RunDir, check_steps

Progress = Callable[[int, int], None]


def check_gguf_destination(out: Path) -> None:
    """Refuse a destination that exists (nothing is overwritten), that is not a .gguf file name, or that cannot be
    written, before anything is loaded; the model card's files beside it must be new too."""
    if out.suffix != ".gguf":
        raise UserError(f"{out} does not end in .gguf; name the file to write NAME.gguf, as llama.cpp, Ollama and "
                        "LM Studio expect.")
    for path in (out, *card_paths(out)):
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} already exists; choose a new name for the GGUF file or remove it first.")
    check_writable(out)


def _leftovers(out: Path) -> None:
    """Remove the temporary files of exports to `out` that were killed: their process is gone (another user's
    process, which this one may not signal, is alive)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)


def _write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for add, token in ((writer.add_bos_token_id, vocab.bos), (writer.add_eos_token_id, vocab.eos),
                       (writer.add_pad_token_id, vocab.pad)):
        if token is not None:
            add(token)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)


def _write(tmp: Path, run: LoadedRun, vocab: Vocab, family: Family, arch: str, kind: str,
           progress: Progress) -> dict[str, int]:
    """The GGUF file at `tmp`: keys, then each tensor converted as it is written (one at a time in memory).
    Returns how many tensors went as each GGML type."""
    cfg = run.config.model
    wanted, file_type = TYPES[kind]
    assert isinstance(run.model, GPT), "export_gguf loads runs of kind gpt"
    tensors = list(model_tensors(run.model, family, arch))
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(run.run.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_keys(writer, family, cfg)
    _write_vocab(writer, vocab)
    if run.chat_template is not None:
        writer.add_chat_template(run.chat_template.template)
    types = [ggml_type(tensor, wanted) for _, tensor in tensors]
    for (name, tensor), qtype in zip(tensors, types):
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), qtype))
        writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, ((_, tensor), qtype) in enumerate(zip(tensors, types), 1):
            writer.write_tensor_data(gguf.quants.quantize(tensor.contiguous().numpy(), qtype))
            progress(done, len(tensors))
    finally:
        writer.close()
    return dict(Counter(qtype.name.lower() for qtype in types))


def export_gguf(run_dir: Path, out: Path, checkpoint: str = "best", kind: str = "f32",
                progress: Progress = lambda done, total: None) -> dict[str, Any]:
    """Write a run's model and tokenizer as the GGUF file `out` (weights as `kind`: f32, f16, bf16 or q8_0), with
    its model card beside it, calling `progress(done, total)` as tensors are written. Everything that can be
    refused is refused before a byte is written."""
    run_dir, out = Path(run_dir), Path(out)
    if kind not in TYPES:
        raise UserError(f"--type {kind} is unknown; use {', '.join(TYPES)}.")
    model = RunDir(run_dir).config().model
    if model.kind != "gpt":
        raise UserError(f"{run_dir} is a {model.kind} model, and llama.cpp computes transformers: export-gguf writes "
                        "lmlab's kind gpt (as gpt2, llama, qwen2 or qwen3).")
    family = choose_family(model, "auto", str(run_dir))
    arch = arch_name(family, model)
    check_steps([run_dir], checkpoint)
    check_gguf_destination(out)
    run = RunDir(run_dir).load(checkpoint, "cpu")  # checks the tokenizer against its checksum
    vocab = gguf_vocab(run.tokenizer, model.vocab_size, str(run_dir))
    _leftovers(out)
    with replacing(out) as tmp:
        counts = _write(tmp, run, vocab, family, arch, kind, progress)
        if out.exists() or out.is_symlink():
            raise UserError(f"{out} was created by another process meanwhile; choose a new name.")
    try:
        write_card(out, run, arch, vocab, kind)
    except BaseException:  # all three files or none
        for path in (out, *card_paths(out)):
            path.unlink(missing_ok=True)
        raise
    return {"out": str(out), "arch": arch, "type": kind, "tensors": counts, "checkpoint": run.checkpoint,
            "step": run.step, "tokenizer": run.tokenizer.spec, "bytes": out.stat().st_size}
