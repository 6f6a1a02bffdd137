"""Peak memory and time of `lmlab prepare` on one-line documents (no line break anywhere), by tokenizer, against
tokenizing the same document in one call, as prepare did before it cut documents into chunks.

    python benchmarks/prepare_memory.py [--mb 5,50] [--tokenizers char,bpe:300] [--whole-mb 5]

Each row runs in a fresh subprocess; peak RSS is the largest process's (the command's, or a worker's), from
getrusage. The "whole document" rows encode the document with the dataset's own tokenizer in one
`encode_batch` call, which is what a document cost before (kept to --whole-mb: at 50 MB char it needs ~17 GB).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.progress import ItemProgress

PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
         "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

WHOLE = """
import json, sys
from pathlib import Path
from lmlab.data.tokenizers import Tokenizer
tok = Tokenizer.load(Path(sys.argv[2]), sys.argv[3])
text = Path(sys.argv[1]).read_text(encoding="utf-8")
print(len(tok.encode_batch([text])[0].ids))
"""

WORDS = "love night day sweet death fair heaven soul heart light dark moon sun star".split()


def one_line(path: Path, mb: int) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(mb * 200_000))[:mb * 1_000_000], encoding="utf-8")
    return path


def measure(*command: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a command."""
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, check=True)
    seconds, kib = done.stdout.split()
    return float(seconds), int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", default="5,50", help="document sizes in MB (comma-separated)")
    parser.add_argument("--tokenizers", default="char,bpe:300")
    parser.add_argument("--whole-mb", type=int, default=5, help="largest document also encoded in one call")
    args = parser.parse_args()
    lmlab = str(Path(sys.executable).with_name("lmlab"))
    table = Table(title="lmlab prepare on a one-line document (peak RSS of the largest process)")
    for column in ("document", "tokenizer", "how", "seconds", "peak RSS", "peak / document"):
        table.add_column(column, justify="left" if column in ("tokenizer", "how") else "right")
    sizes, specs = list(map(int, args.mb.split(","))), args.tokenizers.split(",")
    progress = ItemProgress(console, len(sizes) * len(specs))
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            source = one_line(Path(tmp) / f"one{mb}.txt", mb)
            for spec in specs:
                progress.start(f"a {mb} MB line, {spec}" + (" (and in one call)" if mb <= args.whole_mb else ""))
                out = Path(tmp) / f"data-{mb}-{spec.replace(':', '')}"
                seconds, peak = measure(lmlab, "prepare", str(source), "--tokenizer", spec, "--out-dir", str(out))
                table.add_row(f"{mb} MB", spec, "prepare (chunks)", f"{seconds:.1f}", f"{peak:,.0f} MiB",
                              f"{peak / mb:.1f}×")
                if mb <= args.whole_mb:
                    tokenizer = out / f"one{mb}-{spec.replace(':', '')}" / "tokenizer.json"
                    seconds, peak = measure(sys.executable, "-c", WHOLE, str(source), str(tokenizer), spec)
                    table.add_row(f"{mb} MB", spec, "one call (before)", f"{seconds:.1f}", f"{peak:,.0f} MiB",
                                  f"{peak / mb:.1f}×")
    console.print(table)


if __name__ == "__main__":
    main()
