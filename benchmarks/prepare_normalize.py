"""What `lmlab prepare --normalize` / `--keep-chars` costs: the wall time of preparing Shakespeare (4.6 M characters,
the embedded corpus) with each normalisation against none, and the vocabulary each leaves.

    python benchmarks/prepare_normalize.py [--tokenizer char] [--repeats 3]

Each row runs `lmlab prepare` in a fresh subprocess into a temporary folder (so nothing is reused), `--repeats`
times, and keeps the fastest; the machine's load over the rows is said at the end (a busy machine reads slow).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.progress import ItemProgress

ROWS = {  # label -> the options after `--tokenizer SPEC`
    "none": [],
    "lower": ["--normalize", "lower"],
    "nfkc": ["--normalize", "nfkc"],
    "ascii": ["--normalize", "ascii"],
    "nfkc, ascii, lower": ["--normalize", "nfkc,ascii,lower"],
    "lower, keep a-z space \\n": ["--normalize", "lower", "--keep-chars", "a-z \\n"],
}


def prepare(spec: str, options: list[str]) -> tuple[float, dict]:
    """(seconds, meta.json) of one prepare of Shakespeare into a fresh folder."""
    lmlab = str(Path(sys.executable).with_name("lmlab"))
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([lmlab, "prepare", "shakespeare", "--tokenizer", spec, "--out-dir", out, *options],
                       check=True, capture_output=True)
        seconds = time.perf_counter() - started
        return seconds, json.loads(next(Path(out).glob("*/meta.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="char", help="the tokenizer spec every row prepares with")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is kept")
    args = parser.parse_args()
    table = Table(title=f"lmlab prepare shakespeare --tokenizer {args.tokenizer}: wall time by normalisation")
    for column in ("normalisation", "seconds (best)", "× none", "vocab", "train characters"):
        table.add_column(column, justify="left" if column == "normalisation" else "right")
    progress, base = ItemProgress(console, len(ROWS) * args.repeats), None
    with LoadMeter() as meter:
        for label, options in ROWS.items():
            best, meta = float("inf"), {}
            for repeat in range(args.repeats):
                progress.start(f"{label}, run {repeat + 1} of {args.repeats}")
                seconds, meta = prepare(args.tokenizer, options)
                best = min(best, seconds)
            base = base or best
            table.add_row(label, f"{best:.2f}", f"{best / base:.2f}", f"{meta['vocab_size']:,}",
                          f"{meta['train']['characters']:,}")
    console.print(table)
    warning = busy_warning("this table", meter.load, "its times read slow")
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")


if __name__ == "__main__":
    main()
