"""The files of a Hugging Face model folder: config.json and the safetensors weights read on import; the weights,
config.json, generation_config.json and the tokenizer files written on export, built in a temporary sibling
folder and renamed into place, so nothing is overwritten and a failed export leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmlab.core.errors import UserError
from lmlab.core.fileio import (
    WriteError,
    a_file,
    atomic_write_text,
    check_folder_name,
    fsync,
    read_text,
    sha256_file,
    writing,
)
from lmlab.core.jsontext import parse_json
from lmlab.data.tokenizers import Tokenizer
from lmlab.run.chat import ChatTemplate

# PyTorch's own weight files, which may run code when loaded: lmlab never reads them.
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, as a JSON object."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a Hugging Face model folder (config.json, model.safetensors).")
    try:
        raw = parse_json(read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a Hugging Face model folder (config.json + model.safetensors).")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; download the model again.")
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object; download the model again.")
    if raw.get("quantization_config"):
        raise UserError(f"{path} describes a quantized checkpoint; lmlab trains full-precision weights, so import "
                        "the model's unquantized release.")
    return raw


class Weights:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists, each read when asked
    for (as float32), so importing holds one source tensor at a time besides the model."""

    def __init__(self, folder: Path):
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.exists():
            self.files = [single]
        elif index.exists():
            self.files = self._shards(index)
        elif any((folder / name).exists() for name in TORCH_WEIGHTS):
            raise UserError(f"{folder} holds its weights only in PyTorch's own format (pytorch_model.bin), which can "
                            "run code when loaded, so lmlab does not read it; download the model's model.safetensors, "
                            "or convert it where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
                            ".save_pretrained(NEW_DIR).")
        else:
            raise UserError(f"{folder} has no model.safetensors (nor model.safetensors.index.json); save the model "
                            "with transformers' save_pretrained, which writes it.")
        self.where: dict[str, Any] = {}
        for path in self.files:
            try:
                handle = safe_open(a_file(path), "pt")
            except (SafetensorError, OSError) as err:
                raise UserError(f"{path} is not a readable safetensors file ({err}); download it again.")
            self.where.update((name, (path, handle)) for name in handle.keys())

    @staticmethod
    def _shards(index: Path) -> list[Path]:
        try:
            weight_map = parse_json(read_text(index))["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in names):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (a JSON object with a weight_map); download it again.")
        # A shard is a file beside the index: a name with a folder in it is not followed.
        missing = [str(name) for name in names if Path(name).name != name or not (index.parent / name).is_file()]
        if missing or not names:
            raise UserError(f"{index} lists shards that are not files beside it ({', '.join(missing) or 'none'}); "
                            "download them too.")
        return [index.parent / name for name in names]

    def __call__(self, name: str) -> torch.Tensor | None:
        if name not in self.where:
            return None
        path, handle = self.where[name]
        try:
            return handle.get_tensor(name).float()
        except SafetensorError as err:
            raise UserError(f"{path}: tensor {name} cannot be read ({err}); the file is damaged, download it again.")

    def sha256(self) -> str:
        """Of the weight files' bytes in order: one file's own digest, or that of the shards back to back."""
        return sha256_file(*self.files)


@contextmanager
def building(path: Path, what: str) -> Iterator[Path]:
    """A temporary sibling of `path` to build in, renamed to `path` when the block ends, removed when it fails;
    `path` itself must be new or empty (`what` names it in the refusal), as nothing is overwritten."""
    if path.is_symlink() and not path.exists():  # a link to nothing, which the rename after the work would meet
        raise WriteError(path, os.strerror(errno.EEXIST), errno.EEXIST)
    if path.is_symlink() or path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists; choose a new {what} or remove it first.")
    check_folder_name(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        fsync(tmp)
        try:
            if path.exists():
                path.rmdir()  # empty, checked above
            os.replace(tmp, path)
        except OSError:  # another process wrote `path` meanwhile (not through lmlab, which locks it)
            raise UserError(f"{path} was created by another process meanwhile; choose a new folder.")
        fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")  # a vocabulary's own padding token, where it has one


def pad_id(tokenizer: Tokenizer) -> int | None:
    """The id to pad with: the vocabulary's own padding token, else the end-of-text token."""
    return next((tokenizer.vocab[t] for t in PAD_TOKENS if t in tokenizer.vocab), tokenizer.eot_id)


def write_tokenizer(out: Path, tokenizer: Tokenizer, block_size: int, chat: ChatTemplate | None = None) -> None:
    """tokenizer.json and a tokenizer_config.json that makes `AutoTokenizer` load it as it is (the fast tokenizer
    of the `tokenizers` library, so every kind of lmlab.data.tokenizers.TOKENIZER_KINDS loads), with the
    end-of-text token as eos and bos, a pad token (the vocabulary's own, else the end-of-text token: so
    `tokenizer(texts, padding=True)` works), `<unk>` for a word tokenizer, and the lmlab spec for `import-hf` to
    read back; an imported instruct model's chat template with the special tokens it prints, as the model came.
    A char tokenizer has no end-of-text token, and no pad token either: transformers would hide whichever
    character it named pad from every decoded text (a pad token is special to it), so a batch of a char run's
    texts is padded after `tokenizer.pad_token = ...` names a character, the attention mask hiding it."""
    tokenizer.save(out / "tokenizer.json")
    settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                                "clean_up_tokenization_spaces": False, "lmlab_tokenizer": tokenizer.spec}
    eot, pad = tokenizer.eot_token, pad_id(tokenizer)
    if eot is not None and pad is not None:  # the pad is the end-of-text token where the vocabulary has none
        settings.update(bos_token=eot, eos_token=eot, pad_token=tokenizer.backend.id_to_token(pad))
    if tokenizer.kind.unknown:
        settings["unk_token"] = tokenizer.kind.unknown
    if chat is not None:
        settings.update(chat.tokens, chat_template=chat.template)
    write_json(out / "tokenizer_config.json", settings)


def write_generation_config(out: Path, tokenizer: Tokenizer | None, chat: ChatTemplate | None = None) -> None:
    """What `generate` stops at: the end-of-text id (a char tokenizer has none, so it runs to max_new_tokens), and
    the end of an assistant's turn of a chat template; and what it pads with (`pad_id`)."""
    ids: dict[str, Any] = {}
    if tokenizer is not None and (eot_id := tokenizer.eot_id) is not None:
        ends = [tokenizer.backend.token_to_id(t) for t in (chat.end_of_turn if chat else ())]
        ends = [i for i in ends if i is not None and i != eot_id]
        ids = {"bos_token_id": eot_id, "eos_token_id": [eot_id, *ends] if ends else eot_id,
               "pad_token_id": pad_id(tokenizer)}
    write_json(out / "generation_config.json", ids)
