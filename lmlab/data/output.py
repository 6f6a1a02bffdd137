"""The tokenize pass's output: how a dataset is split, packed and sharded, and the writing side, which records
progress after every finished shard so a killed prepare resumes where it stood."""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.core.config import check_choice, check_counts
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text, fsync, host_memory, human_bytes, writing
from lmlab.data.encode import Encoded
from lmlab.data.normalize import Normalization
from lmlab.data.shards import ShardWriter, TokenShards
from lmlab.data.split import VAL, VAL_WHILE_BUDGET, split_key

LISTED_VAL_DOCUMENTS = 100  # meta.json names the first val documents (in split order), not millions


@dataclass
class PrepareOptions:
    """How `prepare` reads, splits, packs and writes."""

    val_tokens: int | None = None  # size the val split in tokens instead of by --val-fraction of characters
    max_tokens: int | None = None  # stop at the first document boundary at or after this many train tokens
    pack: str = "concat"  # concat: documents joined by end-of-text; crop: one padded row of block_size + 1 each
    block_size: int = 1024  # the context length crop mode cuts to (a row is its inputs and next-token targets)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB as uint16)
    text_field: str = "text"  # the text column of .jsonl / .parquet / hf: sources
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    tokenizer_chars: int = 1_000_000_000  # characters of train text that bpe/word tokenizers are trained on
    gpt2_dir: Path | None = None  # the gpt2 tokenizer's files (see tokenizers.load_gpt2)
    normalization: Normalization = field(default_factory=Normalization)  # what the text goes through first

    def __post_init__(self) -> None:
        check_choice("--pack", self.pack, ("concat", "crop"))
        names = ("val_tokens", "max_tokens", "block_size", "shard_tokens", "workers", "tokenizer_chars")
        check_counts("--", {name.replace("_", "-"): getattr(self, name) for name in names
                            if getattr(self, name) is not None})
        cores = os.cpu_count() or 1
        if self.workers > 4 * cores:
            raise UserError(f"--workers {self.workers} is more than 4 per core ({cores} cores here); each worker is "
                            f"a process tokenizing on one core: use at most {4 * cores}.")
        need, have = 2 * 2 * self.shard_tokens, host_memory()  # a train and a val buffer, 2 bytes a token or more
        if need > have:
            raise UserError(f"--shard-tokens {self.shard_tokens:,} needs {human_bytes(need)} for its two shard "
                            f"buffers, more than the {human_bytes(have)} of memory available; use a smaller value "
                            "(the default is 100000000).")

    def identity(self) -> dict[str, Any]:
        """The options that change the dataset's content or layout."""
        return {"val_tokens": self.val_tokens, "max_tokens": self.max_tokens, "pack": self.pack,
                "block_size": self.block_size if self.pack == "crop" else None, "shard_tokens": self.shard_tokens,
                # an older crop dataset (a joined stream) is not reused as rows
                **({"row_length": self.row_length} if self.row_length else {}),
                **({"normalize": self.normalization.record()} if self.normalization else {})}

    @property
    def row_length(self) -> int | None:
        """Tokens per row of a crop dataset: block_size inputs and their next-token targets."""
        return self.block_size + 1 if self.pack == "crop" else None


class Output:
    """Routes each document to train or val, counts, packs, writes and checkpoints. Val is reordered by split key at
    the end, so it reads the same however it was chosen; routing counts tokens before a crop, so a corpus packed
    both ways holds out the same documents."""

    def __init__(self, work: Path, job: dict[str, Any], dtype: str, eot_id: int | None, options: PrepareOptions,
                 saved: dict[str, Any], val_tokens: int | None = None):
        self.work, self.job, self.options, self.eot_id = work, job, options, eot_id
        self.val_tokens = val_tokens  # --val-tokens, or a --max-tokens cut's share
        self.docs_done = saved.get("docs_done", 0)
        self.counts = saved.get("counts", {s: {"documents": 0, "characters": 0, "bytes": 0, "tokens": 0}
                                           for s in ("train", "val")})
        self.lost_tokens = saved.get("lost_tokens", 0)
        # tokens before a crop cut them
        self.routed = saved.get("routed") or {split: self.counts[split]["tokens"] for split in ("train", "val")}
        self.val_names = [tuple(entry) for entry in saved.get("val_names", [])]
        self.writers = {split: ShardWriter(work, split, dtype, options.shard_tokens, saved.get("shards", {}).get(split))
                        for split in ("train", "valstage")}
        for split, count in saved.get("pending", {}).items():
            self.writers[split].restore_pending(count)
        self.val_index_path = work / "val_index.bin"
        self.val_entries = saved.get("val_entries", 0)
        with open(self.val_index_path, "ab") as f:
            f.truncate(16 * self.val_entries)  # entries after the last checkpoint are written again
        self.val_index: list[tuple[int, int]] = []  # (key, tokens) since the last checkpoint
        self.completed = False  # a shard was finished since the last checkpoint
        self.split, self.doc_ids, self.doc_written = "train", 0, 0
        # A --max-tokens cut's val split holds its ask exactly: the document that would pass it is cut there (its
        # end-of-text kept), the rest of it in neither split. Without a cut, val is whole documents.
        self.cuts = bool(options.max_tokens) and val_tokens is not None
        self.cut_document: str | None = saved.get("cut_document")
        self.reserved = int(self.cuts and eot_id is not None)  # the end-of-text a cut document still ends with

    def _begin_document(self, code: int) -> bool:
        """Choose the next document's split; False at --max-tokens once val is full too."""
        full = self.val_tokens is not None and self.routed["val"] + self.reserved >= self.val_tokens
        self.split = "val" if code == VAL or (code == VAL_WHILE_BUDGET and not full) else "train"
        budget = self.options.max_tokens
        if self.split == "train" and budget and self.routed["train"] >= budget:
            if full or self.val_tokens is None:
                return False
            self.split = "skip"
        self.doc_ids = self.doc_written = 0
        return True

    def _write(self, ids: np.ndarray) -> None:
        self.completed |= self.writers["train" if self.split == "train" else "valstage"].append(ids)
        self.doc_written += len(ids)

    def add(self, tag: tuple, ids: np.ndarray, nbytes: int, characters: int, ends: np.ndarray | None) -> bool:
        """Write one chunk of a document's ids; False when --max-tokens is reached. In crop mode the document becomes
        one padded row, and a cut's val split ends at its ask, in the chunk if it must, each counting the kept text's
        bytes and characters (`ends`: per-token character and byte ends)."""
        index, code, name, first, last = tag
        if first and not self._begin_document(code):
            return False
        if self.split == "skip":
            self.docs_done = index + 1 if last else self.docs_done
            return True
        kept, row = self._val_kept(len(ids)), self.options.row_length
        encoded = len(ids) if kept is None else kept  # the document's tokens routed, before a crop
        take = min(encoded, max(0, row - self.doc_ids)) if row else encoded  # and those written
        if take < len(ids):
            assert ends is not None, "a cut, and crop mode, encode with ends"
            characters, nbytes = (int(ends[0][take - 1]), int(ends[1][take - 1])) if take else (0, 0)
        counts = self.counts[self.split]
        counts["characters"] += characters
        counts["bytes"] += nbytes
        self.lost_tokens += encoded - take
        self.doc_ids += encoded
        self._write(ids[:take])
        if last or kept is not None:
            self._end_document(index, name)
        if kept is not None:  # the rest of the document is passed over
            self.cut_document, self.split = name, "skip"
        return True

    def _val_kept(self, length: int) -> int | None:
        """How many of the next `length` tokens of a val document a cut's val split keeps, where it ends among them;
        None: all of them."""
        if not self.cuts or self.split != "val" or self.val_tokens is None:
            return None
        room = max(0, self.val_tokens - self.routed["val"] - self.doc_ids - self.reserved)
        return room if room < length else None

    def _end_document(self, index: int, name: str) -> None:
        row, counts = self.options.row_length, self.counts[self.split]
        if row:
            real = min(self.doc_written + 1, row)
            self._write(np.full(row - self.doc_written, self.eot_id, np.uint32))
        else:
            if self.eot_id is not None:
                self._write(np.array([self.eot_id], np.uint32))
            real = self.doc_written
        counts["documents"] += 1
        counts["tokens"] += real
        self.routed[self.split] += self.doc_ids + (self.eot_id is not None)
        if self.split == "val":
            key = split_key(name)
            self.val_index.append((key, self.doc_written))
            heapq.heappush(self.val_names, (-key, name))
            if len(self.val_names) > LISTED_VAL_DOCUMENTS:
                heapq.heappop(self.val_names)
        self.docs_done = index + 1

    def add_batch(self, tags: list[tuple], encoded: Encoded) -> bool:
        offset = 0
        for tag, length, nbytes, characters in zip(tags, encoded.lengths, encoded.nbytes, encoded.chars):
            ends = None if encoded.ends is None else encoded.ends[:, offset:offset + length]
            if not self.add(tag, encoded.ids[offset:offset + length], int(nbytes), int(characters), ends):
                return False
            offset += length
        if self.completed and tags[-1][4]:  # a checkpoint records whole documents only
            self.checkpoint()
            self.completed = False
        return True

    def checkpoint(self) -> None:
        """Record everything up to docs_done, for a killed prepare to resume from."""
        pending = {split: w.save_pending() for split, w in self.writers.items()}
        self.checkpoint_val_index()
        fsync(self.work)
        state = {"job": self.job, "docs_done": self.docs_done, "counts": self.counts, "lost_tokens": self.lost_tokens,
                 "cut_document": self.cut_document,
                 "routed": self.routed, "val_names": self.val_names, "val_entries": self.val_entries,
                 "pending": pending, "shards": {split: w.shards for split, w in self.writers.items()}}
        atomic_write_text(self.work / "progress.json", json.dumps(state))

    def finish(self) -> dict[str, list[Path]]:
        """Close the shards and write val in split-key order; returns each split's shard files."""
        (self.work / "progress.json").unlink(missing_ok=True)  # finishing deletes what a resume would read
        if not self.counts["train"]["documents"]:
            raise UserError("no document went to the train split: val took them all; lower --val-fraction / "
                            "--val-tokens or give more documents.")
        if not self.counts["val"]["documents"]:
            raise UserError("no document went to the val split; raise --val-fraction / --val-tokens or give more "
                            "documents.")
        val, asked = self.routed["val"], self.options.val_tokens
        if asked and val < asked:  # the candidates held fewer tokens than their characters promised
            raise UserError(f"--val-tokens {asked} asks for {asked:,} val tokens, and the val split got {val:,} of "
                            f"whole documents; ask for at most {val:,}, or give a larger corpus.")
        train = self.writers["train"].close()
        staged = self.writers["valstage"].close()
        self.checkpoint_val_index()
        index = np.fromfile(self.val_index_path, dtype=np.uint64).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum(index[:, 1].astype(np.int64))])
        view = TokenShards(staged, str(self.writers["train"].buffer.dtype))
        val = ShardWriter(self.work, "val", str(view.dtype), self.options.shard_tokens)
        for doc in np.argsort(index[:, 0], kind="stable"):
            val.append(view[offsets[doc]:offsets[doc + 1]])
        for path in [*staged, self.val_index_path]:
            path.unlink()
        return {"train": train, "val": val.close()}

    def checkpoint_val_index(self) -> None:
        with writing(self.val_index_path), open(self.val_index_path, "ab") as f:
            f.write(np.asarray(self.val_index, dtype=np.uint64).tobytes())
        fsync(self.val_index_path)
        self.val_entries += len(self.val_index)
        self.val_index = []
