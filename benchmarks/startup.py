"""How long `lmlab train` takes from the command to its first line and to its first training step.

    python benchmarks/startup.py [--config configs/shakespeare-char-modern-cpu.toml] [--repeats 5]
        [--tree PATH ...] [--cold]

Prepares data/shakespeare-char if needed, then starts `python -m lmlab train CONFIG` (two steps, one log line
per step, no eval until the end) --repeats times, reads its output and watches the run's metrics.jsonl: its first
line of output, the start event (the model built, the data opened, the run folder written) and the first `train`
line (step 1 done, its loss read back) are timed from the moment the process was started. Each --tree is an lmlab
source tree (a checkout's root) put first on PYTHONPATH (and the working directory left off sys.path: `python
-P`), so two versions can be compared in one sitting: the trees take turns in every round, so a change in the
machine's load hits them alike. Without --tree, the installed lmlab runs. Each tree has a cache folder of its own
(XDG_CACHE_HOME: the measured peak, the memory estimates), filled by one untimed start first, as a user's machine
has it after their first run; with --cold, every start gets an empty one. Prints the median and the best over the
repeats, and the whole command's wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir

COLUMNS = ("first line", "start event", "step 1 done", "exit")


def first_event_times(command: list[str], env: dict[str, str], run: Path) -> dict[str, float]:
    """Seconds from starting `command` to its first line of output, its start event, its first train line, and its
    exit."""
    seen: dict[str, float] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def first_line() -> None:
        output = proc.stdout.readline()
        seen.setdefault("first line", time.perf_counter() - started)
        seen["output"] = output + proc.stdout.read()

    reader = threading.Thread(target=first_line)
    reader.start()
    while proc.poll() is None:
        for event in RunDir(run).events():
            seen.setdefault(event["event"], time.perf_counter() - started)
        time.sleep(0.002)
    exited = time.perf_counter() - started
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{seen['output']}")
    return {"first line": seen["first line"], "start event": seen["start"], "step 1 done": seen["train"],
            "exit": exited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    parser.add_argument("--cold", action="store_true", help="an empty cache folder for every start")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(args.config)).data.dataset).parent)
    trees = args.tree or [""]
    settings = ["train.max_iters=2", "train.log_interval=1", "train.eval_interval=1000"]
    times: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    progress = ItemProgress(console, args.repeats * len(trees))
    with tempfile.TemporaryDirectory(dir=".") as runs, LoadMeter() as meter:
        for round_ in range(-1, args.repeats):  # round -1 fills each tree's cache, untimed
            for i, tree in enumerate(trees):
                if round_ >= 0:
                    progress.start(f"{tree or 'installed'}, round {round_ + 1}")
                cache = Path(runs) / f"cache-{i}" / (f"{round_}" if args.cold else "")
                env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
                env |= {"PYTHONPATH": str(Path(tree).resolve())} if tree else {}
                run = Path(runs) / f"{round_}-{i}"
                command = [sys.executable, "-P", "-m", "lmlab", "train", args.config, "--run", str(run), "--device",
                           "cpu", *(arg for s in settings for arg in ("--set", s))]
                timed = first_event_times(command, env, run)
                if round_ >= 0:
                    times[tree].append(timed)
    cache = "an empty cache each" if args.cold else "a cache filled by a first start"
    table = Table(title=f"`lmlab train {args.config}`: seconds from the command, median (best) of {args.repeats}, "
                        f"{cache}")
    table.add_column("lmlab")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for tree, rows in times.items():
        cells = [f"{statistics.median(r[c] for r in rows):.2f} ({min(r[c] for r in rows):.2f})" for c in COLUMNS]
        table.add_row(tree or "installed", *cells)
    console.print(table)
    warning = busy_warning("the starts", meter.load, "they read slow")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
