"""corpus -> token shards + tokenizer.json + meta.json, streamed, in parallel, resumable, renamed into place at the end.

Passes over the source (each streams it; nothing holds the corpus):
1. scan: hash every document's name (the split order) and content (the dataset's identity), count characters,
   and for `char` collect the character set. Keeps 16 bytes per document.
2. tokenizer training (bpe/word only): the train documents, up to `tokenizer_chars` characters, streamed into
   `tokenizers`' trainer.
3. tokenize: batches of documents encoded by worker processes (lmlab.data.encode), written in order to shards
   (lmlab.data.shards) in a work dir `.NAME.partial`. After every finished shard a progress record is written;
   a killed prepare resumes from it, and the dataset dir appears only by a rename once everything is written.

Memory: IN_FLIGHT_PER_WORKER × workers batches of at most BATCH_CHARS characters (or one larger document)
+ one shard buffer per split (shard_tokens × 2 or 4 bytes) + 16 bytes per document for the split order.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import lmlab
from lmlab.data.corpora import (
    corpus_name,
    iter_documents,
    resolve_sources,
)
from lmlab.data.encode import Encoded, encode_in_order
from lmlab.data.shards import ShardWriter, TokenShards, read_meta
from lmlab.data.split import (
    TRAIN,
    VAL,
    VAL_WHILE_BUDGET,
    Scan,
    pieces,
    plan_split,
    scan,
    split_key,
)
from lmlab.data.tokenizers import Tokenizer, is_path, load_pretrained, parse_spec, train_tokenizer
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text, fsync_dir, sha256_file

BATCH_DOCS = 512  # documents per worker task: large enough that inter-process overhead is small
BATCH_CHARS = 2_000_000  # and small enough that in-flight batches stay a few MB each
LISTED_VAL_DOCUMENTS = 100  # meta.json names the first val documents (in split order), not millions


@dataclass
class PrepareOptions:
    """How `prepare` reads, splits, packs and writes; the defaults reproduce the single-file datasets."""

    val_tokens: int | None = None  # size the val split in tokens instead of by --val-fraction of characters
    max_tokens: int | None = None  # stop at the first document boundary at or after this many train tokens
    pack: str = "concat"  # concat: documents joined by end-of-text; crop: one padded row of block_size + 1 each
    block_size: int = 1024  # the context length crop mode cuts to (a row is its inputs and next-token targets)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB as uint16)
    text_field: str = "text"  # the text column of .jsonl / .parquet / hf: sources
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    tokenizer_chars: int = 1_000_000_000  # characters of train text that bpe/word tokenizers are trained on
    gpt2_dir: Path | None = None  # the gpt2 tokenizer's files (see tokenizers.load_gpt2)

    def __post_init__(self) -> None:
        if self.pack not in ("concat", "crop"):
            raise UserError(f"--pack is {self.pack!r}; use concat or crop.")
        for name in ("val_tokens", "max_tokens", "block_size", "shard_tokens", "workers", "tokenizer_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} is {value}; it must be a positive number.")

    def identity(self) -> dict[str, Any]:
        """The options that change the dataset's content or layout (workers and sampling limits do not)."""
        return {"val_tokens": self.val_tokens, "max_tokens": self.max_tokens, "pack": self.pack,
                "block_size": self.block_size if self.pack == "crop" else None, "shard_tokens": self.shard_tokens,
                # Crop once joined cropped documents into a stream: a dataset made so is not reused as rows.
                **({"row_length": self.row_length} if self.row_length else {})}

    @property
    def row_length(self) -> int | None:
        """Tokens per row of a row-packed (crop) dataset: block_size inputs and their next-token targets."""
        return self.block_size + 1 if self.pack == "crop" else None


def _doc_text(kind: str, text: str) -> str:
    # Char datasets have no end-of-text token, so documents are kept apart by a blank line instead.
    return text.rstrip("\n") + "\n\n" if kind == "char" else text


def _batches(files: list[str], options: PrepareOptions, kind: str, plan: np.ndarray, cut: int | None,
             start: int) -> Iterator[tuple[list[tuple], list[str]]]:
    """(tags, texts) batches from document `start` on; a tag is (document index, split code, name)."""
    tags: list[tuple] = []
    texts: list[str] = []
    characters = 0
    for index, doc in enumerate(iter_documents(files, options.text_field)):
        if index < start:  # already in the shards of an interrupted run
            continue
        for code, name, text in pieces(doc, index, plan, cut):
            texts.append(_doc_text(kind, text))
            tags.append((index, code, name))
            characters += len(texts[-1])
        if len(texts) >= BATCH_DOCS or characters >= BATCH_CHARS:
            yield tags, texts
            tags, texts, characters = [], [], 0
    if texts:
        yield tags, texts


def _training_texts(files: list[str], options: PrepareOptions, plan: np.ndarray, cut: int | None) -> Iterator[str]:
    """The train documents' text, up to options.tokenizer_chars characters: what bpe/word tokenizers learn from."""
    used = 0
    for index, doc in enumerate(iter_documents(files, options.text_field)):
        code, _, text = pieces(doc, index, plan, cut)[0]
        if code == TRAIN:
            yield text
            used += len(text)
            if used >= options.tokenizer_chars:
                return


class _Output:
    """The tokenize pass's writing side: routes each document to train or val, counts, and checkpoints.

    Val documents are staged in corpus order and reordered by their split key at the end, so the val split
    reads in the same order whether it was chosen up front or while streaming.
    """

    def __init__(self, work: Path, job: dict[str, Any], dtype: str, eot_id: int | None, options: PrepareOptions,
                 saved: dict[str, Any]):
        self.work, self.job, self.options, self.eot_id = work, job, options, eot_id
        self.docs_done = saved.get("docs_done", 0)
        self.counts = saved.get("counts", {s: {"documents": 0, "characters": 0, "bytes": 0, "tokens": 0}
                                           for s in ("train", "val")})
        self.lost_tokens = saved.get("lost_tokens", 0)
        # A heap of (-key, name): the first val documents in key order.
        self.val_names = [tuple(entry) for entry in saved.get("val_names", [])]
        self.writers = {split: ShardWriter(work, split, dtype, options.shard_tokens, saved.get("shards", {}).get(split))
                        for split in ("train", "valstage")}
        for split, count in saved.get("pending", {}).items():
            self.writers[split].restore_pending(count)
        self.val_index_path = work / "val_index.bin"
        self.val_entries = saved.get("val_entries", 0)
        with open(self.val_index_path, "ab") as f:
            f.truncate(16 * self.val_entries)  # entries past the last checkpoint are written again
        self.val_index: list[tuple[int, int]] = []  # (key, tokens) of val documents since the last checkpoint
        self.completed = False  # whether the current batch finished a shard (then a checkpoint follows)

    def add(self, tag: tuple, ids: np.ndarray, nbytes: int, characters: int) -> bool:
        """Write one document's ids; False when --max-tokens is reached and the pass should stop.

        In crop mode the document becomes one row: its first row_length ids, or all of them, end-of-text and
        end-of-text padding. Its token count is the real ones (the document's and one end-of-text) only.
        """
        _, code, name = tag
        full = self.options.val_tokens is not None and self.counts["val"]["tokens"] >= self.options.val_tokens
        split = "val" if code == VAL or (code == VAL_WHILE_BUDGET and not full) else "train"
        if split == "train" and self.options.max_tokens and self.counts["train"]["tokens"] >= self.options.max_tokens:
            return False
        row = self.options.row_length
        if row:
            self.lost_tokens += max(0, len(ids) - row)
            real = min(len(ids) + 1, row)
            ids = np.concatenate([ids[:row], np.full(row - min(len(ids), row), self.eot_id, ids.dtype)])
        elif self.eot_id is not None:
            ids = np.append(ids, self.eot_id)
        self.completed |= self.writers["train" if split == "train" else "valstage"].append(ids)
        for key, value in (("documents", 1), ("characters", characters), ("bytes", nbytes),
                           ("tokens", real if row else len(ids))):
            self.counts[split][key] += value
        if split == "val":
            key = split_key(name)
            self.val_index.append((key, len(ids)))
            heapq.heappush(self.val_names, (-key, name))
            if len(self.val_names) > LISTED_VAL_DOCUMENTS:
                heapq.heappop(self.val_names)
        return True

    def add_batch(self, tags: list[tuple], encoded: Encoded) -> bool:
        self.completed, offset = False, 0
        for tag, length, nbytes, characters in zip(tags, encoded.lengths, encoded.nbytes, encoded.chars):
            if not self.add(tag, encoded.ids[offset:offset + length], int(nbytes), int(characters)):
                return False
            offset += length
        self.docs_done = tags[-1][0] + 1
        if self.completed:
            self.checkpoint()
        return True

    def checkpoint(self) -> None:
        """Record everything up to docs_done: after this, a killed prepare resumes from here."""
        pending = {split: w.save_pending() for split, w in self.writers.items()}
        self.checkpoint_val_index()
        fsync_dir(self.work)
        state = {"job": self.job, "docs_done": self.docs_done, "counts": self.counts, "lost_tokens": self.lost_tokens,
                 "val_names": self.val_names, "val_entries": self.val_entries, "pending": pending,
                 "shards": {split: w.shards for split, w in self.writers.items()}}
        atomic_write_text(self.work / "progress.json", json.dumps(state))

    def finish(self) -> dict[str, list[Path]]:
        """Close the shards and write val in split-key order; returns each split's shard files.

        The progress record goes first: finishing renames and deletes the files a resume would read, so a
        prepare killed while finishing starts over rather than resume from a state that is gone.
        """
        (self.work / "progress.json").unlink(missing_ok=True)
        if not self.counts["train"]["documents"] or not self.counts["val"]["documents"]:
            empty = "train" if not self.counts["train"]["documents"] else "val"
            raise UserError(f"no document went to the {empty} split; raise --val-fraction / --val-tokens or give "
                            "more documents.")
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
        with open(self.val_index_path, "ab") as f:
            np.asarray(self.val_index, dtype=np.uint64).reshape(-1, 2).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self.val_entries += len(self.val_index)
        self.val_index = []


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
                    TextColumn("{task.fields[tokens]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=console is None)


def _resume_or_start(work: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The progress record of an interrupted prepare of the same job, or {} after clearing the work dir."""
    record = work / "progress.json"
    if record.exists():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            saved = {}
        if saved.get("job") == job and (work / "tokenizer.json").exists():
            return saved
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {}


def _tokenizer(work: Path, spec: str, files: list[str], options: PrepareOptions, found: Scan, plan: np.ndarray,
               progress: Progress, fixed: Tokenizer | None) -> Tokenizer:
    """Train (or, on resume, reload; or take the fixed one) the tokenizer and save it where the workers read it."""
    path = work / "tokenizer.json"
    if path.exists() and fixed is None:
        return Tokenizer.load(path, spec)
    task = progress.add_task("training the tokenizer", total=None, tokens="")
    tokenizer = fixed or train_tokenizer(spec, _training_texts(files, options, plan, found.first_cut),
                                         ["".join(sorted(found.charset))])
    progress.remove_task(task)
    tokenizer.save(path)
    return tokenizer


def _tokenize(work: Path, files: list[str], options: PrepareOptions, tokenizer: Tokenizer, plan: np.ndarray,
              found: Scan, output: _Output, progress: Progress) -> None:
    task = progress.add_task("tokenizing", total=len(plan), completed=output.docs_done, tokens="")
    started, first_tokens = time.perf_counter(), output.counts["train"]["tokens"] + output.counts["val"]["tokens"]
    batches = _batches(files, options, tokenizer.kind, plan, found.first_cut, output.docs_done)
    encoded = encode_in_order(batches, work / "tokenizer.json", tokenizer.spec, options.workers, options.row_length)
    try:
        for tags, result in encoded:
            if not output.add_batch(tags, result):
                break
            tokens = output.counts["train"]["tokens"] + output.counts["val"]["tokens"]
            rate = (tokens - first_tokens) / (time.perf_counter() - started)
            progress.update(task, completed=output.docs_done, tokens=f"{tokens:,} tokens {rate:,.0f} tokens/s")
    finally:
        encoded.close()  # stops the worker pool, also when --max-tokens ends the pass early


def _reusable(target: Path, job: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The meta of a finished dataset made by the same job, None if there is none; refuses to replace another."""
    if not (target / "meta.json").exists():
        return None
    meta = read_meta(target)
    made_by = {"input_sha256": meta.get("input_sha256"), "tokenizer": meta.get("tokenizer"),
               "val_fraction": meta["split"].get("val_fraction"),
               **meta.get("options", PrepareOptions().identity()),  # datasets from before the options existed
               **({"tokenizer_identity": meta["tokenizer_identity"]} if "tokenizer_identity" in meta else {})}
    if made_by == job:
        return meta
    if not force:
        raise UserError(f"{target} already holds a different dataset; pass --force to replace it or --name to "
                        "write a new one.")
    return None


def prepare(sources: list[str], spec: str, name: str | None = None, out_dir: Path = Path("data"),
            val_fraction: float = 0.1, force: bool = False, options: PrepareOptions | None = None,
            console: Console | None = None) -> tuple[Path, dict[str, Any], bool]:
    """Prepare a dataset dir; returns (dir, meta, built). An identical finished dataset is reused, not rebuilt;
    an interrupted one is resumed from its last finished shard. `spec` is a tokenizer kind, or the path of a folder
    whose tokenizer to use as it is (a Hugging Face model's, an lmlab run's or dataset's: `load_pretrained`)."""
    options = options or PrepareOptions()
    # A tokenizer that needs no training is loaded before the long scan: a missing file fails at once.
    fixed = load_pretrained(Path(spec)) if is_path(spec) else None
    spec = fixed.spec if fixed else spec
    kind, _ = parse_spec(spec)
    if options.pack == "crop" and kind == "char":
        raise UserError("--pack crop pads each document's row with the end-of-text token, which the char tokenizer "
                        "does not have; use --pack concat or a word, bpe, gpt2 or tiktoken tokenizer.")
    files = resolve_sources(sources)
    target = Path(out_dir) / f"{name or corpus_name(sources)}-{spec.replace(':', '')}"
    if not (target / "meta.json").exists() and target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} exists and is not an lmlab dataset; remove it or choose another --name.")
    # Another dataset of the same spec may have another tokenizer of that spec (a run's word:1000): its identity
    # then tells the two apart.
    same_tokenizer = {"tokenizer_identity": fixed.identity()} if fixed else {}
    if kind in ("gpt2", "tiktoken", "pretrained") and not fixed:
        fixed = train_tokenizer(spec, [], [], options.gpt2_dir)
    clock = [time.perf_counter()]
    with _progress(console) as progress:
        found = scan(files, options.text_field, val_fraction, kind == "char", progress)
        clock.append(time.perf_counter())
        job = {"input_sha256": found.sha256, "tokenizer": spec, "val_fraction": val_fraction, **options.identity(),
               **same_tokenizer}
        meta = _reusable(target, job, force)
        if meta is not None:
            return target, meta, False
        plan, rule = plan_split(found, val_fraction, options.val_tokens, sources)
        target.parent.mkdir(parents=True, exist_ok=True)
        work = target.parent / f".{target.name}.partial"
        saved = _resume_or_start(work, job)
        tokenizer = _tokenizer(work, spec, files, options, found, plan, progress, fixed)
        clock.append(time.perf_counter())
        dtype = "uint16" if tokenizer.vocab_size < 2**16 else "uint32"
        output = _Output(work, job, dtype, tokenizer.eot_id, options, saved)
        _tokenize(work, files, options, tokenizer, plan, found, output, progress)
    shards = output.finish()
    clock.append(time.perf_counter())
    rule |= {"val_documents": [n for _, n in sorted(output.val_names, reverse=True)]} if len(plan) > 1 else {}
    meta = {
        "source": sources, "name": target.name, "tokenizer": spec, "tokenizer_kind": kind,
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "input_sha256": found.sha256, "split": rule,
        **{split: {**output.counts[split], "sha256": sha256_file(*shards[split])} for split in ("train", "val")},
        "shards": {split: [{"file": p.name, "tokens": p.stat().st_size // np.dtype(dtype).itemsize} for p in paths]
                   for split, paths in shards.items()},
        "options": options.identity(), "lost_tokens": output.lost_tokens,
        # A row-packed split: readers find its layout here (lmlab.data.shards.Rows), not in the options.
        **({"rows": {"length": options.row_length, "pad_id": tokenizer.eot_id}} if options.row_length else {}),
        "tokenizer_sha256": sha256_file(work / "tokenizer.json"), **same_tokenizer,
        # Of this process only: a resumed prepare times the part it did.
        "seconds": dict(zip(("scan", "tokenizer", "tokenize"), np.diff(clock).round(3).tolist())),
        "lmlab_version": lmlab.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(work / "meta.json", json.dumps(meta, indent=2))
    fsync_dir(work)
    _swap_into_place(work, target)
    return target, meta, True


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished dir into place; an old dataset is moved aside first and deleted only afterwards."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
