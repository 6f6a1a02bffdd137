"""Tokens/s and peak memory of `lmlab prepare` on a generated corpus, against a one-document-at-a-time loop.

    python benchmarks/tokenize_throughput.py [--mb 300] [--workers 1,2] [--tokenizer bpe:4096]

The script writes the same synthetic documents (Zipf-distributed pseudo-words, log-normal lengths) as
.jsonl and as .parquet, runs `lmlab prepare` on each with every worker count in a subprocess, and reads the
tokenize phase's seconds from the dataset's meta.json. The naive row encodes the same .jsonl one document at
a time with the same trained tokenizer in one process and collects the ids in a Python list, as a whole-corpus
prepare would. Peak RSS is the largest process's (the parent's, or a worker's), from getrusage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.progress import ItemProgress

PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
         "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

NAIVE = """
import json, sys
from pathlib import Path
from lmlab.data.tokenizers import Tokenizer
tok = Tokenizer.load(Path(sys.argv[2]), sys.argv[3])
ids = []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        ids.extend(tok.encode(json.loads(line)["text"]))
        ids.append(tok.eot_id)
print(len(ids))
"""


def write_corpus(folder: Path, megabytes: int, seed: int = 0) -> tuple[Path, Path]:
    """The same documents as docs.jsonl and docs.parquet, about `megabytes` MB of text."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(50_000)]
    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    texts, size = [], 0
    while size < megabytes * 1e6:
        words = rng.choice(len(vocab), size=int(rng.lognormal(6, 1)) + 5, p=weights)
        texts.append(" ".join(vocab[w] for w in words) + ".\n")
        size += len(texts[-1])
    jsonl, parquet = folder / "docs.jsonl", folder / "docs.parquet"
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=10_000)
    return jsonl, parquet


def measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a command run in a fresh subprocess."""
    out = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, check=True)
    seconds, kib = out.stdout.split()
    return float(seconds), int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="corpus size in MB of text")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--tokenizer", default="bpe:4096")
    args = parser.parse_args()
    table = Table(title=f"lmlab prepare on a {args.mb} MB synthetic corpus, {args.tokenizer}")
    for column in ("source", "workers", "tokens", "tokenize phase", "tokens/s (tokenize)", "whole prepare",
                   "peak RSS"):
        table.add_column(column, justify="left" if column == "source" else "right")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        sources = write_corpus(folder, args.mb)
        console.print(f"wrote {args.mb} MB as jsonl and parquet in {time.perf_counter() - started:.0f} s")
        reference = None  # the first jsonl dataset: its tokenizer and token count are the naive loop's
        worker_counts = list(map(int, args.workers.split(",")))
        progress, warnings = ItemProgress(console, len(sources) * len(worker_counts) + 1), []
        for source in sources:
            for workers in worker_counts:
                progress.start(f"lmlab prepare {source.name}, {workers} worker{'s' * (workers > 1)}")
                out = folder / f"data-{source.suffix[1:]}-{workers}"
                with LoadMeter() as meter:
                    wall, rss = measured([sys.executable, "-m", "lmlab", "prepare", str(source), "--tokenizer",
                                          args.tokenizer, "--workers", str(workers), "--out-dir", str(out)])
                warnings.append(busy_warning(f"{source.name} with {workers} workers", meter.load, "its rate reads low"))
                dataset = next(out.iterdir())
                meta = json.loads((dataset / "meta.json").read_text())
                tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
                phase = meta["seconds"]["tokenize"]
                reference = reference or (dataset, tokens)
                table.add_row(source.suffix[1:], str(workers), f"{tokens:,}", f"{phase:.1f} s",
                              f"{tokens / phase:,.0f}", f"{wall:.1f} s", f"{rss:,.0f} MiB")
        dataset, tokens = reference
        progress.start("the naive loop, one document at a time")
        wall, rss = measured([sys.executable, "-c", NAIVE, str(sources[0]), str(dataset / "tokenizer.json"),
                              args.tokenizer])
        table.add_row("jsonl, naive loop", "1", f"{tokens:,}", f"{wall:.1f} s", f"{tokens / wall:,.0f}",
                      f"{wall:.1f} s", f"{rss:,.0f} MiB")
    console.print(table)
    console.print("tokenize phase: encoding and writing shards, from meta.json; whole prepare adds the scan and "
                  "tokenizer training. The naive loop's time is all of it (startup included).")
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
