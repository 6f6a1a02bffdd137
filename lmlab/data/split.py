"""How a corpus splits into train and val: a scan of every document's name (its place in the split order),
size and content digest, then the plan that puts each document on one side."""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from lmlab.core.errors import UserError
from lmlab.core.progress import TaskLines
from lmlab.data.corpora import NON_BLANK, Document, iter_documents, parquet_rows


def split_key(name: str) -> int:
    """A document's place in the split order: the first 8 bytes of sha256(name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


@dataclass
class Scan:
    keys: np.ndarray  # uint64 split-order key per document
    chars: np.ndarray  # int64 characters per document
    sha256: str  # of every document's name and text, in order
    charset: set[str]
    first_cut: int | None  # the tail split point, used when the corpus is a single document


def scan(files: list[str], text_field: str, val_fraction: float, want_charset: bool,
         progress: Progress | TaskLines,
         normalize: Callable[[str], str] | None = None) -> Scan:
    keys, chars, digest = array("Q"), array("q"), hashlib.sha256()
    charset: set[str] = set()
    first_cut: int | None = None
    task = progress.add_task("scanning", total=parquet_rows(files), tokens="")
    for doc in iter_documents(files, text_field, normalize):
        keys.append(split_key(doc.name))
        chars.append(len(doc.text))
        digest.update(doc.name.encode() + b"\0")
        for at in range(0, len(doc.text), 1 << 20):  # a long document is not copied whole
            digest.update(doc.text[at:at + (1 << 20)].encode())
        digest.update(b"\0")
        if want_charset:
            charset.update(doc.text)
        if first_cut is None:
            # Where a corpus of this one document is split: the line start nearest the tail fraction; 0 where a side
            # would hold no text (refused only if the corpus is this one document: a short first one of many is no
            # fault).
            share = int(len(doc.text) * (1 - val_fraction))
            cut = doc.text.rfind("\n", 0, share) + 1 or share
            first_cut = cut if NON_BLANK.search(doc.text, 0, cut) and NON_BLANK.search(doc.text, cut) else 0
        if len(keys) % 1024 == 0:  # per document, the bar's bookkeeping would cost more than the scan
            progress.update(task, completed=len(keys))
    progress.remove_task(task)
    return Scan(np.frombuffer(keys, np.uint64), np.frombuffer(chars, np.int64), digest.hexdigest(), charset, first_cut)


TRAIN, VAL, VAL_WHILE_BUDGET = 0, 1, 2  # a document's place in the split plan
# A val split sized in tokens draws from the documents with the lowest keys whose characters hold POOL_MARGIN times
# the tokens asked at the tokenizer's measured characters per token: the chars per token of a document varies, and
# "at least N" must hold. Before the tokenizer exists (it learns from the other documents) FIRST_GUESS is assumed.
POOL_MARGIN = 1.25
FIRST_GUESS = 8.0


def plan_split(scan: Scan, val_fraction: float, val_tokens: int | None, names: list[str],
               chars_per_token: float = FIRST_GUESS, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """Each document's split: TRAIN, VAL, or (with a size in tokens) VAL_WHILE_BUDGET; the rule, with that size as
    `val_tokens`.

    By default the val split is whole documents in sha256-of-name order until they hold val_fraction of the
    characters: the same corpus always splits the same way and adding a file moves few others. With val_tokens,
    the documents with the lowest keys that hold about POOL_MARGIN x val_tokens tokens (at `chars_per_token`) are
    candidates; they go to val in corpus order until it holds val_tokens, the rest to train. A --max-tokens cut
    reads only the start of the corpus, so there the candidates are the documents whose keys fall in the share of
    the key range val takes of the cut (val_fraction, or POOL_MARGIN x val_tokens / (train + val) when asked):
    spread through the corpus, they fill val as the cut's train tokens come (at least the lowest key's document),
    up to val_tokens exactly: the tokenize pass cuts the document that would pass it (`output.Output`).
    """
    n = len(scan.keys)
    if n == 0:
        raise UserError(f"the corpus {' '.join(names)} is empty; give files that contain text.")
    if n == 1:
        if scan.first_cut == 0:
            raise UserError(f"{names[0]} is too short to split into train and val; give it more text.")
        return np.zeros(1, np.int8), {"rule": "tail of the only document", "val_fraction": val_fraction,
                                   "cut_at_char": scan.first_cut}
    order = np.lexsort((np.arange(n), scan.keys))
    plan = np.full(n, TRAIN, np.int8)
    # The val split's size in tokens: --val-tokens; else, for a --max-tokens cut, val_fraction of the cut (train
    # being the rest: a small cut must not lose half its tokens to a val split sized by the whole corpus); else None
    # (val_fraction of the characters).
    target = (val_tokens if val_tokens or not max_tokens
              else math.ceil(max_tokens * val_fraction / (1 - val_fraction)))
    if max_tokens:
        assert target is not None, "a --max-tokens cut sizes the val split"
        share = POOL_MARGIN * target / (target + max_tokens) if val_tokens else val_fraction
        plan[scan.keys < np.uint64(share * 2.0**64) if share < 1 else slice(None)] = VAL_WHILE_BUDGET
        plan[order[0]] = VAL_WHILE_BUDGET
    elif val_tokens:
        held = np.cumsum(scan.chars[order])
        count = min(int(np.searchsorted(held, POOL_MARGIN * val_tokens * chars_per_token)) + 1, n - 1)
        plan[order[:count]] = VAL_WHILE_BUDGET
    if target:
        return plan, {"rule": "documents with the lowest sha256 of name, up to a token budget",
                      "val_fraction": val_fraction, "val_tokens": target}
    count = min(int(np.searchsorted(np.cumsum(scan.chars[order]), val_fraction * scan.chars.sum())) + 1, n - 1)
    plan[order[:count]] = VAL
    return plan, {"rule": "whole documents by sha256 of name", "val_fraction": val_fraction}


def val_refusal(scan: Scan, val_tokens: int, chars_per_token: float) -> str | None:
    """Why --val-tokens cannot be given with a train split beside it: all the corpus's documents but the largest
    hold fewer tokens at the tokenizer's `chars_per_token`; None when it can."""
    spare = (int(scan.chars.sum()) - int(scan.chars.max())) / chars_per_token
    if len(scan.keys) < 2 or spare >= val_tokens:
        return None
    return (f"--val-tokens {val_tokens} asks for a val split of {val_tokens:,} tokens, but this corpus's documents, "
            f"less one for train, hold about {spare:,.0f} (at {chars_per_token:.2f} characters a token); ask for at "
            "most that, or give a larger corpus.")


def parts(doc: Document, index: int, plan: np.ndarray, cut: int | None) -> list[tuple[int, str, int, int]]:
    """(split code, name, start, stop) of the parts of one document: all of it, or for the only document of a
    corpus a train and a val part (spans, so a long document is not copied)."""
    if len(plan) == 1:
        assert cut is not None, "the only document of a corpus has its cut (scan's first_cut)"
        return [(TRAIN, doc.name, 0, cut), (VAL, doc.name + "#val", cut, len(doc.text))]
    return [(int(plan[index]), doc.name, 0, len(doc.text))]
