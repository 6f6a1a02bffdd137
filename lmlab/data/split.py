"""How a corpus splits into train and val: a scan of every document's name (its place in the split order),
size and content digest, then the plan that puts each document on one side."""

from __future__ import annotations

import hashlib
import re
from array import array
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from lmlab.core.errors import UserError
from lmlab.data.corpora import Document, iter_documents, parquet_rows


def split_key(name: str) -> int:
    """A document's place in the split order: the first 8 bytes of sha256(name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


_NON_BLANK = re.compile(r"\S")


def _tail_cut(doc: Document, val_fraction: float) -> int:
    """Where a corpus of one document is split: the line start nearest the tail fraction."""
    text = doc.text
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
    if not _NON_BLANK.search(text, 0, cut) or not _NON_BLANK.search(text, cut):  # no copies of a long document
        raise UserError(f"{doc.name} is too short to split into train and val; give it more text.")
    return cut


@dataclass
class Scan:
    keys: np.ndarray  # uint64 split-order key per document
    chars: np.ndarray  # int64 characters per document
    sha256: str  # of every document's name and text, in order
    charset: set[str]
    first_cut: int | None  # the tail split point, used when the corpus is a single document


def scan(files: list[str], text_field: str, val_fraction: float, want_charset: bool, progress: Progress) -> Scan:
    keys, chars, digest, charset, first_cut = array("Q"), array("q"), hashlib.sha256(), set(), None
    task = progress.add_task("scanning", total=parquet_rows(files), tokens="")
    for doc in iter_documents(files, text_field):
        keys.append(split_key(doc.name))
        chars.append(len(doc.text))
        digest.update(doc.name.encode() + b"\0")
        for at in range(0, len(doc.text), 1 << 20):  # a long document is not copied whole
            digest.update(doc.text[at:at + (1 << 20)].encode())
        digest.update(b"\0")
        if want_charset:
            charset.update(doc.text)
        if first_cut is None:
            first_cut = _tail_cut(doc, val_fraction) if len(doc.text) > 1 else 0
        if len(keys) % 1024 == 0:  # per document, the bar's bookkeeping would cost more than the scan
            progress.update(task, completed=len(keys))
    progress.remove_task(task)
    return Scan(np.frombuffer(keys, np.uint64), np.frombuffer(chars, np.int64), digest.hexdigest(), charset, first_cut)


TRAIN, VAL, VAL_WHILE_BUDGET = 0, 1, 2  # a document's place in the split plan


def plan_split(scan: Scan, val_fraction: float, val_tokens: int | None, names: list[str]) -> tuple[np.ndarray, dict]:
    """Each document's split: TRAIN, VAL, or (with val_tokens) VAL_WHILE_BUDGET.

    By default the val split is whole documents in sha256-of-name order until they hold val_fraction of the
    characters: the same corpus always splits the same way and adding a file moves few others. With
    val_tokens, a document whose key falls in the lowest val_fraction of the key range goes to val, in corpus
    order, until val holds val_tokens tokens; the rest go to train.
    """
    n = len(scan.keys)
    if n == 0:
        raise UserError(f"the corpus {' '.join(names)} is empty; give files that contain text.")
    if n == 1:
        if scan.first_cut == 0:
            raise UserError(f"{names[0]} is too short to split into train and val; give it more text.")
        return np.zeros(1, np.int8), {"rule": "tail of the only document", "val_fraction": val_fraction,
                                   "cut_at_char": scan.first_cut}
    if val_tokens:
        candidate = scan.keys < np.uint64(val_fraction * 2.0**64)
        return np.where(candidate, VAL_WHILE_BUDGET, TRAIN).astype(np.int8), {"rule": "documents with the lowest sha256 of name, up to a token "
                                                  "budget", "val_fraction": val_fraction, "val_tokens": val_tokens}
    order = np.lexsort((np.arange(n), scan.keys))
    count = min(int(np.searchsorted(np.cumsum(scan.chars[order]), val_fraction * scan.chars.sum())) + 1, n - 1)
    plan = np.full(n, TRAIN, np.int8)
    plan[order[:count]] = VAL
    return plan, {"rule": "whole documents by sha256 of name", "val_fraction": val_fraction}


def parts(doc: Document, index: int, plan: np.ndarray, cut: int | None) -> list[tuple[int, str, int, int]]:
    """(split code, name, start, stop) of the parts of one document: all of it, or for the only document of a
    corpus a train and a val part (spans, so a long document is not copied)."""
    if len(plan) == 1:
        return [(TRAIN, doc.name, 0, cut), (VAL, doc.name + "#val", cut, len(doc.text))]
    return [(int(plan[index]), doc.name, 0, len(doc.text))]
