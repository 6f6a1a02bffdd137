"""corpus -> token shards + tokenizer.json + meta.json: streamed (no pass holds the corpus), in parallel, resumable
after every shard, renamed into place at the end. docs/reference/data.md gives the passes and their memory."""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
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

from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text, fsync, plain_name, sha256_file
from lmlab.core.locks import WriterLock
from lmlab.core.progress import TaskLines, task_lines
from lmlab.core.version import __version__
from lmlab.data.corpora import (
    corpus_name,
    iter_documents,
    resolve_sources,
)
from lmlab.data.encode import encode_in_order
from lmlab.data.normalize import with_normalizer
from lmlab.data.output import Output, PrepareOptions
from lmlab.data.shards import read_meta
from lmlab.data.split import FIRST_GUESS, TRAIN, Scan, parts, plan_split, scan, val_refusal
from lmlab.data.tokenizers import (
    TOKENIZER_KINDS,
    Tokenizer,
    TokenizerKind,
    chunk_spans,
    is_path,
    json_object,
    load_pretrained,
    parse_spec,
    train_tokenizer,
)

BATCH_DOCS = 512  # documents (chunks of long ones) per worker task: so many that inter-process overhead is small
BATCH_CHARS = 2_000_000  # and small enough that in-flight batches stay a few MB each
SAMPLE_CHARS = 1_000_000  # of train text, to measure a tokenizer's characters per token


SEPARATOR = "\n\n"  # what ends every document of a char dataset, which has no end-of-text token


def _batches(files: list[str], options: PrepareOptions, kind: TokenizerKind, plan: np.ndarray, cut: int | None,
             start: int) -> Iterator[tuple[list[tuple], list[str]]]:
    """(tags, texts) batches from document `start` on, each text a chunk of a document tagged (document index, split
    code, name, first chunk?, last chunk?)."""
    tags: list[tuple] = []
    texts: list[str] = []
    characters = 0
    for index, doc in enumerate(iter_documents(files, options.text_field, options.normalization.function())):
        if index < start:  # already in the shards of an interrupted run
            continue
        for code, name, begin, end in parts(doc, index, plan, cut):
            if kind.per_character:  # documents are kept apart by a blank line instead
                while end > begin and doc.text[end - 1] == "\n":
                    end -= 1
            spans = list(chunk_spans(doc.text, begin, end, kind.name))
            for number, (a, b) in enumerate(spans):
                last = number == len(spans) - 1
                texts.append(doc.text[a:b] + (SEPARATOR if kind.per_character and last else ""))
                tags.append((index, code, name, number == 0, last))
                characters += len(texts[-1])
                # at a document's end where it can: progress is recorded after whole documents only
                full = len(texts) >= BATCH_DOCS or characters >= BATCH_CHARS
                if (full and last) or characters >= 2 * BATCH_CHARS:
                    yield tags, texts
                    tags, texts, characters = [], [], 0
    if texts:
        yield tags, texts


def _training_texts(files: list[str], options: PrepareOptions, plan: np.ndarray, cut: int | None,
                    kind: TokenizerKind, most: int) -> Iterator[str]:
    """The train documents' text in chunks, up to `most` characters, for a tokenizer to learn."""
    used = 0
    for index, doc in enumerate(iter_documents(files, options.text_field, options.normalization.function())):
        code, _, begin, end = parts(doc, index, plan, cut)[0]
        if code == TRAIN:
            for a, b in chunk_spans(doc.text, begin, end, kind.name):
                yield doc.text[a:b]
                used += b - a
                if used >= most:
                    return


def _chars_per_token(tokenizer: Tokenizer, files: list[str], options: PrepareOptions, plan: np.ndarray,
                     cut: int | None) -> float:
    """Characters per token of the tokenizer on up to SAMPLE_CHARS of the train documents' text."""
    sample = _training_texts(files, options, plan, cut, tokenizer.kind, SAMPLE_CHARS)
    texts = list(itertools.islice(sample, 1000))
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    return sum(map(len, texts)) / tokens if tokens else FIRST_GUESS


def _progress(console: Console | None) -> Progress | TaskLines:
    """The scan's, the tokenizer's and the tokenizing's progress bars."""
    lines = console and task_lines(console, "documents")
    return lines or Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("documents"), TextColumn("{task.fields[tokens]}"),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                             disable=console is None)


def _resume_or_start(work: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The progress record of an interrupted prepare of the same job, or {} after clearing the work dir."""
    saved = json_object(work / "progress.json")
    if saved.get("job") == job and (work / "tokenizer.json").exists():
        return saved
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {}


def _tokenizer(work: Path, spec: str, files: list[str], options: PrepareOptions, found: Scan, plan: np.ndarray,
               progress: Progress | TaskLines, fixed: Tokenizer | None, kind: TokenizerKind) -> Tokenizer:
    """Train (or, on resume, reload; or take the fixed one) the tokenizer and save it where the workers read it."""
    path = work / "tokenizer.json"
    if path.exists() and fixed is None:
        return Tokenizer.load(path, spec)
    task = progress.add_task("training the tokenizer", total=None, tokens="")
    # The separator is lmlab's, not the corpus's: a char vocabulary holds it even if no document has a line break.
    texts = _training_texts(files, options, plan, found.first_cut, kind, options.tokenizer_chars)
    tokenizer = fixed or train_tokenizer(spec, texts, ["".join(sorted(found.charset | set(SEPARATOR)))])
    progress.remove_task(task)
    tokenizer.save(path)
    return tokenizer


def _tokenize(work: Path, files: list[str], options: PrepareOptions, tokenizer: Tokenizer, plan: np.ndarray,
              found: Scan, output: Output, progress: Progress | TaskLines) -> None:
    task = progress.add_task("tokenizing", total=len(plan), completed=output.docs_done, tokens="")
    started, first_tokens = time.perf_counter(), output.counts["train"]["tokens"] + output.counts["val"]["tokens"]
    batches = _batches(files, options, tokenizer.kind, plan, found.first_cut, output.docs_done)
    encoded = encode_in_order(batches, work / "tokenizer.json", tokenizer.spec, options.workers,
                              ends=options.pack == "crop" or output.cuts)
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
    """Prepare a dataset dir; returns (dir, meta, built). An identical finished dataset is reused, an interrupted one
    resumed. `spec` is a tokenizer kind, or the path of a folder whose tokenizer to use as it is."""
    options = options or PrepareOptions()
    # before the long scan, so a missing file fails at once
    fixed = load_pretrained(Path(spec)) if is_path(spec) else None
    spec = fixed.spec if fixed else spec
    kind = TOKENIZER_KINDS[parse_spec(spec)[0]]
    if options.pack == "crop" and kind.per_character:
        ending = ", ".join(k.written for k in TOKENIZER_KINDS.values() if k.named and not k.per_character)
        raise UserError(f"--pack crop pads each document's row with the end-of-text token, which the {kind.name} "
                        f"tokenizer does not have; use --pack concat or a tokenizer that has one ({ending}).")
    if kind.per_character and options.normalization.drops("\n"):
        raise UserError("the char tokenizer separates documents with a line break, which --keep-chars / --drop-chars "
                        "would remove; keep \\n (e.g. --keep-chars 'a-z \\n').")
    if not 0.0 < val_fraction < 1.0:  # (nan included) before the scan, which cuts a lone document by it
        raise UserError(f"--val-fraction is {val_fraction}; it must be between 0 and 1, e.g. 0.1.")
    files = resolve_sources(sources)
    name = plain_name(corpus_name(sources) + options.normalization.suffix() if name is None else name, "--name",
                      "--out-dir")
    target = Path(out_dir) / f"{name}-{spec.replace(':', '')}"
    lock = WriterLock(target)
    lock.acquire(f"{target} is being prepared by another process ({{holder}}); wait for it to finish, or choose "
                 "another --name.")
    try:
        return _prepare(sources, files, spec, target, val_fraction, force, options, console, fixed, kind)
    finally:
        lock.release()


def _prepare(sources: list[str], files: list[str], spec: str, target: Path, val_fraction: float, force: bool,
             options: PrepareOptions, console: Console | None, fixed: Tokenizer | None, kind: TokenizerKind
             ) -> tuple[Path, dict[str, Any], bool]:
    """`prepare` under the dataset's lock; `fixed`: the tokenizer a path named, already loaded."""
    _remove_old_copies(target)
    if not (target / "meta.json").exists() and target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} exists and is not an lmlab dataset; remove it or choose another --name.")
    # two tokenizers of one spec (a run's word:1000) are told apart by their identity
    same_tokenizer = {"tokenizer_identity": fixed.identity()} if fixed else {}
    if not kind.trained and not fixed:  # loaded before the long scan: fails at once
        fixed = train_tokenizer(spec, [], [], options.gpt2_dir)
    clock = [time.perf_counter()]
    with _progress(console) as progress:
        found = scan(files, options.text_field, val_fraction, kind.per_character, progress,
                     options.normalization.function())
        clock.append(time.perf_counter())
        job = {"input_sha256": found.sha256, "tokenizer": spec, "val_fraction": val_fraction, **options.identity(),
               **same_tokenizer}
        meta = _reusable(target, job, force)
        if meta is not None:
            return target, meta, False
        plan, rule = plan_split(found, val_fraction, options.val_tokens, sources, max_tokens=options.max_tokens)
        target.parent.mkdir(parents=True, exist_ok=True)
        work = target.parent / f".{target.name}.partial"
        saved = _resume_or_start(work, job)
        tokenizer = _tokenizer(work, spec, files, options, found, plan, progress, fixed, kind)
        if options.val_tokens and not options.max_tokens:  # the candidates again, at the tokenizer's own ratio
            ratio = _chars_per_token(tokenizer, files, options, plan, found.first_cut)
            refusal = val_refusal(found, options.val_tokens, ratio)
            if refusal:
                shutil.rmtree(work, ignore_errors=True)  # its tokenizer is of no use to another --val-tokens
                raise UserError(refusal)
            plan, rule = plan_split(found, val_fraction, options.val_tokens, sources, ratio)
        clock.append(time.perf_counter())
        dtype = "uint16" if tokenizer.vocab_size < 2**16 else "uint32"
        output = Output(work, job, dtype, tokenizer.eot_id, options, saved, rule.get("val_tokens"))
        _tokenize(work, files, options, tokenizer, plan, found, output, progress)
    shards = output.finish()
    # Only now: the workers encoded text already normalised, the separator of a char dataset included.
    if options.normalization:
        with_normalizer(tokenizer.backend, options.normalization)
        tokenizer.save(work / "tokenizer.json")
    clock.append(time.perf_counter())
    rule |= {"val_documents": [n for _, n in sorted(output.val_names, reverse=True)]} if len(plan) > 1 else {}
    rule |= {"cut_document": output.cut_document} if output.cut_document else {}
    meta = {
        "source": sources, "name": target.name, "tokenizer": spec, "tokenizer_kind": kind.name,
        "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype,
        "input_sha256": found.sha256, "split": rule, "normalize": options.normalization.record(),
        **{split: {**output.counts[split], "sha256": sha256_file(*shards[split]),
                   **({"uncropped_tokens": output.routed[split]} if options.row_length else {})}
           for split in ("train", "val")},
        "shards": {split: [{"file": p.name, "tokens": p.stat().st_size // np.dtype(dtype).itemsize} for p in paths]
                   for split, paths in shards.items()},
        "options": options.identity(), "lost_tokens": output.lost_tokens,
        # A row-packed split: readers find its layout here (lmlab.data.shards.Rows), not in the options.
        **({"rows": {"length": options.row_length, "pad_id": tokenizer.eot_id}} if options.row_length else {}),
        "tokenizer_sha256": sha256_file(work / "tokenizer.json"), **same_tokenizer,
        "seconds": dict(zip(("scan", "tokenizer", "tokenize"), np.diff(clock).round(3).tolist())),
        "lmlab_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(work / "meta.json", json.dumps(meta, indent=2))
    fsync(work)
    _swap_into_place(work, target)
    return target, meta, True


def _remove_old_copies(target: Path) -> None:
    """Delete what a prepare killed while replacing the dataset left of the old one: the lock's holder alone swaps,
    so every such copy is a leftover."""
    for old in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished dir into place; an old dataset is moved aside first and deleted only afterwards."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
