"""Tokenize batches of documents in worker processes, in order, with a fixed number of batches in flight.

Each worker loads the dataset's tokenizer.json once and encodes whole batches with the `tokenizers` batch API.
The processes are the parallelism, so each worker's `tokenizers` runs single-threaded (TOKENIZERS_PARALLELISM=
false): N workers use N cores instead of N × cores threads fighting over them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmlab.data.tokenizers import Tokenizer

IN_FLIGHT_PER_WORKER = 2  # one batch being encoded, one queued, so a worker never waits for the reader

ENCODE_CHARS = 1 << 18  # characters handed to the tokenizer at once: its per-token objects are ~100 bytes each

_tokenizer: Tokenizer | None = None  # the worker process's own copy


class Encoded(NamedTuple):
    ids: np.ndarray  # uint32, every text's ids back to back
    lengths: np.ndarray  # int64, ids per text
    nbytes: np.ndarray  # int64, UTF-8 bytes per text (bits per byte divides by them)
    chars: np.ndarray  # int64, characters per text
    # With `ends` (a cropped dataset, which keeps a document's first tokens only, or a --max-tokens cut, whose val
    # split ends inside a document): (2, ids) int64, for each id the characters (row 0) and UTF-8 bytes (row
    # 1) of its text up to the end of that token, so the kept part of a text can be counted.
    ends: np.ndarray | None = None


def _start_worker(path: str, spec: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = Tokenizer.load(Path(path), spec)


def _groups(texts: list[str]) -> Iterator[list[str]]:
    """Consecutive texts of about ENCODE_CHARS characters (a longer text alone)."""
    group: list[str] = []
    size = 0
    for text in texts:
        if group and size + len(text) > ENCODE_CHARS:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


def _ends(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Characters and UTF-8 bytes of `text` up to the end of each token, (2, tokens) (tokens never end
    mid-character)."""
    chars = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    nbytes = np.concatenate([[0], np.cumsum(widths)])
    return np.stack([chars, nbytes[chars]])


def _encode_in_worker(texts: list[str], ends: bool) -> Encoded:
    """Every text's ids, counts and (with `ends`) token end positions, encoded by the worker's tokenizer ENCODE_CHARS
    characters at a time so that its per-token objects never exceed that; the texts are chunks of at most
    tokenizers.CHUNK_CHARS characters."""
    assert _tokenizer is not None, "the pool's initializer loads it"
    ids, lengths, token_ends = [], [], []
    for group in _groups(texts):
        for text, encoding in zip(group, _tokenizer.encode_batch(group)):
            ids.append(np.asarray(encoding.ids, dtype=np.uint32))
            lengths.append(len(encoding.ids))
            if ends:
                token_ends.append(_ends(text, encoding.offsets))
    nbytes = np.fromiter((len(t.encode()) for t in texts), dtype=np.int64, count=len(texts))
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    return Encoded(flat, np.asarray(lengths, np.int64), nbytes, chars,
                   np.concatenate(token_ends, axis=1) if ends else None)


def encode_in_order(batches: Iterator[tuple[Any, list[str]]], tokenizer_path: Path, spec: str,
                    workers: int, ends: bool = False) -> Generator[tuple[Any, Encoded], None, None]:
    """Yield (tag, Encoded) for each (tag, texts) batch, in input order (`ends`: see Encoded).

    At most `IN_FLIGHT_PER_WORKER * workers` batches are read ahead: `Pool.imap` would read the whole input
    ahead of the workers, and so the whole corpus into memory when the source is faster than tokenization.
    """
    with multiprocessing.Pool(workers, _start_worker, (str(tokenizer_path), spec)) as pool:
        pending: deque = deque()
        for tag, texts in batches:
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts, ends))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        for tag, result in pending:
            yield tag, result.get()
