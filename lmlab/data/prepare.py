"""corpus -> tokenizer -> train.bin / val.bin + tokenizer.json + meta.json, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import lmlab
from lmlab.data.corpora import Document, load_corpus
from lmlab.data.tokenizers import Tokenizer, parse_spec, train_tokenizer
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text, fsync_dir, sha256_file


@dataclass
class Split:
    train: list[Document]
    val: list[Document]
    rule: dict[str, Any]


def split_documents(docs: list[Document], val_fraction: float) -> Split:
    """Hold out whole documents (a play is a document), chosen by a hash of their names.

    The order is a pure function of the names, so the same corpus always splits the same way and adding a
    file moves few others. A corpus of one document is split at the line nearest the tail fraction.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction is {val_fraction}; it must be between 0 and 1, e.g. 0.1.")
    if len(docs) == 1:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
        if not text[:cut].strip() or not text[cut:].strip():
            raise UserError(f"{docs[0].name} is too short to split into train and val; give it more text.")
        rule = {"rule": "tail of the only document", "val_fraction": val_fraction, "cut_at_char": cut}
        return Split([Document(docs[0].name, text[:cut])], [Document(docs[0].name + "#val", text[cut:])], rule)
    order = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    target = val_fraction * sum(len(d.text) for d in docs)
    val, size = [], 0
    while size < target and len(val) < len(docs) - 1:
        val.append(order[len(val)])
        size += len(val[-1].text)
    names = {d.name for d in val}
    rule = {"rule": "whole documents by sha256 of name", "val_fraction": val_fraction,
            "val_documents": [d.name for d in val]}
    return Split([d for d in docs if d.name not in names], val, rule)


def _doc_texts(tokenizer_kind: str, docs: list[Document]) -> list[str]:
    # Char datasets have no end-of-text token, so documents are kept apart by a blank line instead.
    if tokenizer_kind == "char":
        return [d.text.rstrip("\n") + "\n\n" for d in docs]
    return [d.text for d in docs]


def _tokenize(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(texts):
        ids.extend(doc_ids)
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    return np.asarray(ids, dtype=dtype)


def corpus_sha256(docs: list[Document]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return digest.hexdigest()


def _write_dataset(tmp: Path, tokenizer: Tokenizer, split: Split) -> dict[str, Any]:
    tokenizer.save(tmp / "tokenizer.json")
    stats = {}
    for name, docs in (("train", split.train), ("val", split.val)):
        texts = _doc_texts(tokenizer.kind, docs)
        tokens = _tokenize(tokenizer, texts)
        path = tmp / f"{name}.bin"
        with open(path, "wb") as f:
            tokens.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        stats[name] = {
            "documents": len(docs),
            "characters": sum(len(t) for t in texts),
            "bytes": sum(len(t.encode()) for t in texts),  # of the text tokenized: bits per byte divides by it
            "tokens": int(tokens.size),
            "sha256": sha256_file(path),
        }
    stats["dtype"] = "uint16" if tokenizer.vocab_size < 2**16 else "uint32"
    return stats


def prepare(sources: list[str], spec: str, name: str | None = None, out_dir: Path = Path("data"),
            val_fraction: float = 0.1, force: bool = False,
            gpt2_dir: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """Prepare a dataset dir; returns (dir, meta, built). An identical finished dataset is reused, not rebuilt.
    `gpt2_dir` holds GPT-2's tokenizer files for the `gpt2` spec."""
    kind, _ = parse_spec(spec)
    corpus_name, docs = load_corpus(sources)
    target = Path(out_dir) / f"{name or corpus_name}-{spec.replace(':', '')}"
    source_hash = corpus_sha256(docs)
    if (target / "meta.json").exists():
        meta = read_meta(target)
        if (meta.get("input_sha256"), meta.get("tokenizer"), meta["split"].get("val_fraction")) == (
                source_hash, spec, val_fraction):
            return target, meta, False
        if not force:
            raise UserError(f"{target} already holds a different dataset; pass --force to replace it or --name to "
                            "write a new one.")
    elif target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} exists and is not an lmlab dataset; remove it or choose another --name.")

    split = split_documents(docs, val_fraction)
    tokenizer = train_tokenizer(spec, [d.text for d in split.train], [d.text for d in docs], gpt2_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _write_dataset(tmp, tokenizer, split)
        meta = {
            "source": sources, "name": target.name, "tokenizer": spec, "tokenizer_kind": kind,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": stats.pop("dtype"),
            "input_sha256": source_hash, "split": split.rule, **stats,
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "lmlab_version": lmlab.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        fsync_dir(tmp)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, meta, True


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished dir into place; an old dataset is moved aside first and deleted only afterwards."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(dataset: Path) -> dict[str, Any]:
    """Read a dataset's meta.json, with one clear sentence if the dir is not a finished dataset."""
    path = Path(dataset) / "meta.json"
    if not path.exists():
        raise UserError(f"dataset {dataset} does not exist or is unfinished (no meta.json); "
                        "create it with `lmlab prepare`.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; re-run `lmlab prepare --force` for this dataset.")
