"""Token shards on disk: numbered flat files of token ids that readers see as one split's array, checked against
meta.json before anything trains on them."""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_bytes, open_file, read_text, sha256_file
from lmlab.core.jsontext import parse_json
from lmlab.data.tokenizers import read_backend

FIX = "prepare the dataset again with `lmlab prepare ... --force`"  # what a dataset that fails a check needs


@dataclass(frozen=True)
class Rows:
    """A row-packed split: rows of `length` tokens, a document's first then `pad_id` (end-of-text, so a row's first
    one is real and the rest padding)."""

    length: int
    pad_id: int


class TokenShards:
    """The shards of a split as one read-only array; `rows` None for a token stream."""

    def __init__(self, paths: list[Path], dtype: str, rows: Rows | None = None):
        self.paths, self.rows = list(paths), rows
        self.parts = [np.memmap(p, dtype=np.dtype(dtype), mode="r") if p.stat().st_size else
                      np.zeros(0, dtype=np.dtype(dtype)) for p in paths]
        self.starts = list(np.cumsum([0] + [len(p) for p in self.parts]))
        self.dtype = np.dtype(dtype)
        self.sha256: str | None = None  # of the bytes, once `verify_split` has read them

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(len(self))
        first = min(bisect.bisect_right(self.starts, start) - 1, len(self.parts) - 1)
        last = max(first + 1, bisect.bisect_left(self.starts, stop))  # the window is in parts first..last - 1
        pieces = [self.parts[i][max(0, start - self.starts[i]):max(0, stop - self.starts[i])]
                  for i in range(first, last)]
        # inside one shard this is a memory-map view; across a boundary, a copy
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def chunks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        """The whole split in order, `size` tokens at a time."""
        for part in self.parts:
            for at in range(0, len(part), size):
                yield part[at:at + size]


def read_meta(dataset: Path) -> dict[str, Any]:
    path = Path(dataset) / "meta.json"
    if not path.exists():
        raise UserError(f"dataset {dataset} does not exist or is unfinished (no meta.json); "
                        "create it with `lmlab prepare`.")
    try:
        return parse_json(read_text(path))
    except ValueError:  # not UTF-8, or not JSON
        raise UserError(f"{path} is not valid JSON; re-run `lmlab prepare --force` for this dataset.")


def _check_tokenizer(dataset: Path, meta: dict[str, Any]) -> None:
    """Refuse a meta.json whose dtype or vocabulary is not the files': the ids would be garbage."""
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{dataset}/meta.json has no valid vocab_size ({vocab!r}); {FIX}.")
    if dtype != ("uint16" if vocab < 2**16 else "uint32"):
        raise UserError(f"{dataset}/meta.json says dtype {dtype!r}, but ids of a vocabulary of {vocab:,} tokens are "
                        f"stored as {'uint16' if vocab < 2**16 else 'uint32'}; {FIX}.")
    try:
        actual = read_backend(Path(dataset) / "tokenizer.json", FIX).get_vocab_size()
    except FileNotFoundError:
        raise UserError(f"{dataset}/tokenizer.json is missing; {FIX}.")
    if meta.get("tokenizer_sha256") and sha256_file(Path(dataset) / "tokenizer.json") != meta["tokenizer_sha256"]:
        raise UserError(f"{dataset}/tokenizer.json does not match the checksum meta.json records for it (it was "
                        f"edited or damaged since the dataset was prepared, so its ids would mean other text); {FIX}.")
    if actual != vocab:
        raise UserError(f"{dataset}/meta.json says vocab_size {vocab:,} but its tokenizer.json has {actual:,} tokens; "
                        f"the files do not belong together: {FIX}.")


def open_tokens(dataset: Path, split: str, dtype: str, verify: bool = True,
                meta: dict[str, Any] | None = None) -> TokenShards:
    """A split as one array over its shards, each file's size checked against meta.json (`meta`, where the caller
    read it already); with `verify`, its bytes too (`verify_split`)."""
    meta = meta or read_meta(dataset)
    _check_tokenizer(dataset, meta)
    width = np.dtype(dtype).itemsize
    listed = listed_shards(meta, split)
    paths = [Path(dataset) / s["file"] for s in listed]
    for path, shard in zip(paths, listed):
        try:
            with open_file(path) as f:  # a pipe, a device or a folder in its place is refused, not mapped
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise UserError(f"{path} is missing; re-run `lmlab prepare` for this dataset.")
        if size % width or (shard.get("tokens") is not None and size != shard["tokens"] * width):
            raise UserError(f"{path} holds {size:,} bytes but meta.json lists {shard.get('tokens') or 0:,} {dtype} "
                            f"tokens ({(shard.get('tokens') or 0) * width:,} bytes); it was truncated or replaced: "
                            f"{FIX}.")
    tokens = TokenShards(paths, dtype, row_layout(meta))
    if verify:
        verify_split(dataset, split, tokens, meta)
    return tokens


def verify_split(dataset: Path, split: str, tokens: TokenShards, meta: dict[str, Any]) -> None:
    """Refuse a split whose sha256 (kept as `tokens.sha256`) is not meta.json's or whose ids pass the vocabulary:
    a shard edited in place keeps its size."""
    digest, top = hashlib.sha256(), -1
    for chunk in tokens.chunks():
        digest.update(chunk)  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's stubs do not say so
        top = max(top, int(chunk.max()) if len(chunk) else -1)
    tokens.sha256 = digest.hexdigest()
    expected = meta.get(split, {}).get("sha256")
    if expected and tokens.sha256 != expected:
        raise UserError(f"the {split} split of {dataset} ({', '.join(p.name for p in tokens.paths)}) does not match "
                        f"the checksum meta.json records for it: it was edited or damaged since it was prepared; "
                        f"{FIX}.")
    if top >= meta["vocab_size"]:
        raise UserError(f"the {split} split of {dataset} holds token id {top:,}, beyond its vocabulary of "
                        f"{meta['vocab_size']:,} tokens; {FIX}.")


def listed_shards(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """A split's shard files and their tokens as meta.json lists them (a dataset from before shards: SPLIT.bin)."""
    return meta.get("shards", {}).get(split, [{"file": f"{split}.bin", "tokens": meta.get(split, {}).get("tokens")}])


def row_layout(meta: dict) -> Rows | None:
    rows = meta.get("rows")
    return Rows(rows["length"], rows["pad_id"]) if rows else None


def windows_in(meta: dict, split: str, block_size: int) -> int:
    """How many windows of block_size targets a split holds, as its meta.json tells: consecutive windows, or the rows
    of a row-packed split (what `evals.evaluate.split_windows` counts in the opened split). Counted in the tokens its
    shards store: a row-packed split's `tokens` leave out its padding."""
    rows, tokens = row_layout(meta), sum(shard["tokens"] for shard in listed_shards(meta, split))
    return (tokens - 1) // block_size if rows is None else tokens // rows.length


def covered(windows: int, split_windows: int) -> str:
    """What a score of `windows` of the val split's `split_windows` covers, as every line that tells it says it."""
    if windows >= split_windows:
        return "the whole val split"
    return f"{windows:,} of the val split's {split_windows:,} windows"


class ShardWriter:
    """Appends tokens to `SPLIT_00000.bin`, ... of `shard_tokens` tokens each, holding one shard in memory."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int, shards: list[int] | None = None):
        self.folder, self.split = Path(folder), split
        self.buffer = np.empty(shard_tokens, dtype=np.dtype(dtype))
        self.fill = 0
        self.shards = list(shards or [])  # token counts of the finished shard files

    def path(self, index: int) -> Path:
        return self.folder / f"{self.split}_{index:05d}.bin"

    @property
    def pending_path(self) -> Path:
        return self.folder / f"{self.split}.pending"

    def append(self, tokens: np.ndarray) -> bool:
        """Add tokens; True when this completed at least one shard file."""
        shards = len(self.shards)
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self._write_shard()
        return len(self.shards) > shards

    def _write_shard(self) -> None:
        atomic_write_bytes(self.path(len(self.shards)), self.buffer[:self.fill].data)
        self.shards.append(self.fill)
        self.fill = 0

    def save_pending(self) -> int:
        """Persist the unfinished shard's tokens for a resume; returns how many there are."""
        atomic_write_bytes(self.pending_path, self.buffer[:self.fill].tobytes())
        return self.fill

    def restore_pending(self, count: int) -> None:
        if count:
            self.buffer[:count] = np.fromfile(self.pending_path, dtype=self.buffer.dtype, count=count)
        self.fill = count

    def close(self) -> list[Path]:
        """Write the last, partial shard and return the shard files; a split of one shard becomes SPLIT.bin."""
        if self.fill or not self.shards:
            self._write_shard()
        self.buffer = np.empty(0, dtype=self.buffer.dtype)  # freed before the next writer fills
        self.pending_path.unlink(missing_ok=True)
        if len(self.shards) == 1:
            os.replace(self.path(0), self.folder / f"{self.split}.bin")
            return [self.folder / f"{self.split}.bin"]
        return [self.path(i) for i in range(len(self.shards))]
