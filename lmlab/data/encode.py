"""Tokenize batches of documents in worker processes, in order, with a fixed number of batches in flight.

Each worker loads the dataset's tokenizer.json once and encodes whole batches with the `tokenizers` batch API.
The processes are the parallelism, so each worker's `tokenizers` runs single-threaded (TOKENIZERS_PARALLELISM=
false): N workers use N cores instead of N × cores threads fighting over them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmlab.data.tokenizers import Tokenizer

IN_FLIGHT_PER_WORKER = 2  # one batch being encoded, one queued, so a worker never waits for the reader

_tokenizer: Tokenizer | None = None  # the worker process's own copy


class Encoded(NamedTuple):
    ids: np.ndarray  # uint32, every document's ids back to back
    lengths: np.ndarray  # int64, ids per document
    nbytes: np.ndarray  # int64, UTF-8 bytes per document (bits per byte divides by them)
    chars: np.ndarray  # int64, characters per document


def _start_worker(path: str, spec: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = Tokenizer.load(Path(path), spec)


def encode_texts(tokenizer: Tokenizer, texts: list[str], keep: int | None = None) -> Encoded:
    """Every document's ids; with `keep`, bytes and characters count only the text of its first `keep` tokens
    (what a cropped dataset holds), so bits per byte and chars per token describe the kept text."""
    encodings = tokenizer.encode_batch(texts)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    kept = [t if keep is None or len(e.ids) <= keep else t[:e.offsets[keep - 1][1]] for t, e in zip(texts, encodings)]
    nbytes = np.fromiter((len(t.encode()) for t in kept), dtype=np.int64, count=len(texts))
    chars = np.fromiter(map(len, kept), dtype=np.int64, count=len(texts))
    return Encoded(flat, lengths, nbytes, chars)


def _encode_in_worker(texts: list[str], keep: int | None) -> Encoded:
    return encode_texts(_tokenizer, texts, keep)


def encode_in_order(batches: Iterator[tuple[Any, list[str]]], tokenizer_path: Path, spec: str,
                    workers: int, keep: int | None = None) -> Iterator[tuple[Any, Encoded]]:
    """Yield (tag, Encoded) for each (tag, texts) batch, in input order (`keep`: see encode_texts).

    At most `IN_FLIGHT_PER_WORKER * workers` batches are read ahead: `Pool.imap` would read the whole input
    ahead of the workers, and so the whole corpus into memory when the source is faster than tokenization.
    """
    with multiprocessing.Pool(workers, _start_worker, (str(tokenizer_path), spec)) as pool:
        pending: deque = deque()
        for tag, texts in batches:
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts, keep))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()
