"""What checking a dataset against its meta.json costs: every byte of a split hashed (sha256) and its largest id
compared with the vocabulary, as `lmlab train` (new run or resume), `eval` and `data stats` do before reading it.

    python benchmarks/integrity_cost.py [--gb 4] [--dir /tmp] [--repeats 2]

Writes a split of random uint16 ids of --gb GB (in 100M-token shards, as `prepare` writes a large corpus) with a
meta.json describing it under --dir, times opening it with and without the check, prints a table, and deletes it.
The first pass reads from the disk, the others from the page cache: both are shown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from lmlab.commands.common import console
from lmlab.data.shards import open_tokens

SHARD_TOKENS = 100_000_000


def write_split(folder: Path, tokens: int, vocab: int) -> None:
    """A dataset dir whose train split is `tokens` random ids in shards, described by meta.json as prepare would."""
    rng, digest, shards, left = np.random.default_rng(0), hashlib.sha256(), [], tokens
    while left:
        ids = rng.integers(0, vocab, min(left, SHARD_TOKENS), dtype=np.uint16)
        path = folder / f"train_{len(shards):05d}.bin"
        ids.tofile(path)
        digest.update(ids.tobytes())
        shards.append({"file": path.name, "tokens": len(ids)})
        left -= len(ids)
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab)}, "unk_token": "t0"}}))
    meta = {"vocab_size": vocab, "dtype": "uint16", "train": {"tokens": tokens, "sha256": digest.hexdigest()},
            "shards": {"train": shards}}
    (folder / "meta.json").write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the split in GB")
    parser.add_argument("--dir", default="/tmp", help="where to write it (deleted at the end)")
    parser.add_argument("--repeats", type=int, default=2, help="checks timed after the first")
    args = parser.parse_args()
    tokens = int(args.gb * 1e9 / 2)
    folder = Path(tempfile.mkdtemp(prefix="lmlab-integrity-", dir=args.dir))
    try:
        with console.status(f"Writing {args.gb:g} GB of token shards to {folder}..."):
            write_split(folder, tokens, vocab=50_257)
        rows = []
        for run in range(1 + args.repeats):
            if run == 0:  # from the disk, as far as this process can ask: drop the files' cached pages first
                for shard in folder.glob("train_*.bin"):
                    with open(shard, "rb+") as f:
                        os.fsync(f.fileno())  # written back, so that the kernel may drop them
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            began = time.perf_counter()
            open_tokens(folder, "train", "uint16", verify=False)
            unchecked = time.perf_counter() - began
            began = time.perf_counter()
            open_tokens(folder, "train", "uint16", verify=True)
            checked = time.perf_counter() - began
            rows.append(("first (disk)" if run == 0 else f"again {run} (cached)", unchecked, checked))
        table = Table(title=f"Checking a {args.gb:g} GB split ({tokens:,} uint16 tokens, "
                            f"{-(-tokens // SHARD_TOKENS)} shards) against meta.json")
        for column in ("pass", "open, unchecked", "open + check", "check rate"):
            table.add_column(column, justify="left" if column == "pass" else "right")
        for name, unchecked, checked in rows:
            table.add_row(name, f"{unchecked:.3f} s", f"{checked:.2f} s", f"{args.gb / (checked - unchecked):.2f} GB/s")
        console.print(table)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
