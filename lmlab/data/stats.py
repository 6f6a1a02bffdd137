"""What a dataset holds: documents, tokens, document lengths against the context length, chars per token.

Document lengths come from the end-of-text separators in the token shards (in a row-packed dataset, from where
each row's padding starts), so nothing is re-tokenized and nothing beyond the shards needs to be stored: a
10B-token dataset is scanned in memory-mapped chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.shards import Rows, TokenShards, listed_shards, open_tokens, read_meta

CHUNK_TOKENS = 1 << 24  # scanned at a time
FRACTION_OFF = 0.1  # a val split of whole documents this share of --val-fraction's ask above or below it is said


def _stream_lengths(tokens: TokenShards, eot: int) -> list[np.ndarray]:
    lengths, previous, offset = [], -1, 0  # the separator before the first document, the chunk's place in the split
    for chunk in tokens.chunks(CHUNK_TOKENS):
        ends = np.flatnonzero(chunk == eot) + offset
        lengths.append(np.diff(ends, prepend=previous) - 1)
        previous = ends[-1] if len(ends) else previous
        offset += len(chunk)
    return lengths


def _row_lengths(tokens: TokenShards, rows: Rows) -> list[np.ndarray]:
    """Tokens before each row's first pad id; a row without one holds a document cropped to the whole row."""
    lengths, per_chunk = [], max(1, CHUNK_TOKENS // rows.length)
    for first in range(0, len(tokens) // rows.length, per_chunk):
        pad = tokens[first * rows.length:(first + per_chunk) * rows.length].reshape(-1, rows.length) == rows.pad_id
        lengths.append(np.where(pad.any(1), pad.argmax(1), rows.length))
    return lengths


def document_lengths(dataset: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """Tokens per document (the separator not counted; after cropping, in a cropped dataset), train then val;
    None without an end-of-text token."""
    eot = meta.get("eot_id")
    if eot is None:
        return None
    lengths = []
    for split in ("train", "val"):
        tokens = open_tokens(dataset, split, meta["dtype"])
        lengths += _row_lengths(tokens, tokens.rows) if tokens.rows else _stream_lengths(tokens, eot)
    return np.concatenate(lengths)


def landing(meta: dict[str, Any]) -> list[str]:
    """Where each split sized in tokens landed against its ask, in a sentence each: whole documents pass the ask by
    part of one (a document of 40,000 tokens makes a val split of 20,000 hold 40,000), a --max-tokens cut's val split
    is its ask (its last document cut there), and a --max-tokens cut larger than the corpus stops short. Counted as
    the split was chosen: before a crop cut the documents. A val split of whole documents by --val-fraction, where
    far from its ask: `held_out`."""
    options, rule, lines = meta.get("options", {}), meta["split"], []
    share = f"--val-fraction {rule.get('val_fraction')} of the --max-tokens cut"
    asks = [("train", options.get("max_tokens"), "--max-tokens"),
            ("val", rule.get("val_tokens"), "--val-tokens" if options.get("val_tokens") else share)]
    for split, asked, what in asks:
        if not asked:
            continue
        got, documents = meta[split].get("uncropped_tokens", meta[split]["tokens"]), meta[split]["documents"]
        cut = rule.get("cut_document") if split == "val" and got == asked else None
        off = ("" if got == asked else f"{100 * (1 - got / asked):.1f}% short of " if got < asked else
               f"{100 * (got / asked - 1):.1f}% over ")
        why = (f"its last document, {cut}, cut there" if cut else "the corpus ended first" if got < asked else
               f"whole documents, of {got / max(documents, 1):,.0f} tokens on average")
        cropped = " before cropping" if meta.get("rows") else ""
        lines.append(f"{split}: {got:,} tokens{cropped}, {off}the {asked:,} asked ({what}): {why}")
    return lines + (held_out(meta) if rule.get("rule") == "whole documents by sha256 of name" else [])


def held_out(meta: dict[str, Any]) -> list[str]:
    """The share of the characters a val split of whole documents holds, in a sentence where it is more than
    FRACTION_OFF of --val-fraction's ask from it (a document larger than the ask passes it by most of itself: 22%
    held out for 10% asked, unsaid before)."""
    asked, val, train = meta["split"]["val_fraction"], meta["val"], meta["train"]
    share = val["characters"] / (val["characters"] + train["characters"])
    if abs(share / asked - 1) <= FRACTION_OFF:
        return []
    return [f"val: {100 * share:.1f}% of the characters, not the {100 * asked:g}% asked (--val-fraction {asked:g}): "
            f"documents are split whole, {val['documents']:,} of {val['documents'] + train['documents']:,} to val, of "
            f"{val['characters'] / val['documents']:,.0f} characters on average"]


def dataset_stats(dataset: Path, block_size: int | None = None) -> dict[str, Any]:
    """Counts and document-length figures; block_size defaults to the crop length of a cropped dataset, else 1024."""
    meta = read_meta(dataset)
    options = meta.get("options", {})
    block_size = block_size or options.get("block_size") or 1024
    splits = [meta["train"], meta["val"]]
    stats: dict[str, Any] = {
        "dataset": str(dataset), "tokenizer": meta["tokenizer"], "pack": options.get("pack", "concat"),
        "block_size": block_size, "documents": sum(s["documents"] for s in splits),
        "tokens": sum(s["tokens"] for s in splits), "characters": sum(s["characters"] for s in splits),
        "shards": {split: len(listed_shards(meta, split)) for split in ("train", "val")},
        "landing": landing(meta),
    }
    stats["chars_per_token"] = stats["characters"] / stats["tokens"]
    if meta.get("rows"):  # what a row-packed dataset stores beyond its tokens, and a model computes on in vain
        stored = sum(s["tokens"] for split in ("train", "val") for s in listed_shards(meta, split))
        stats["share_padding"] = 1 - stats["tokens"] / stored
    lengths = document_lengths(Path(dataset), meta)
    if lengths is not None and len(lengths):
        beyond = np.maximum(lengths - block_size, 0)
        lost = meta.get("lost_tokens", 0)  # cropped away at prepare time: the lengths here are after cropping
        stats |= {
            "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)), "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
            "share_documents_beyond": float((lengths > block_size).mean()),
            "share_tokens_beyond": float(beyond.sum() / max(lengths.sum(), 1)),
            "lost_tokens": lost, "share_tokens_lost": lost / (int(lengths.sum()) + lost),
        }
        if meta.get("rows"):  # a row without padding is a document that was longer than its row, and was cut
            stats |= {"row_length": meta["rows"]["length"],
                      "share_documents_cropped": float((lengths >= meta["rows"]["length"]).mean())}
    return {**stats, "lengths": lengths}
