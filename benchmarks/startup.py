"""How long `lmlab train` takes from the command to its first line and to its first training step, and where those
seconds go, on a machine's first run of a shape and on its second.

    python benchmarks/startup.py [--config configs/shakespeare-char-modern-cpu.toml] [--budget 90s] [--size auto]
        [--repeats 3] [--tree PATH ...]

Prepares data/shakespeare-char if needed, then, --repeats times, starts `python -m lmlab train CONFIG` (one log line
per step, no evaluation before step 1000) twice on an empty cache folder (XDG_CACHE_HOME: the peak, the machine's
choices, the memory estimates): the first run measures and keeps what the second reads back, as on a user's machine
(with --size auto, the timing of the sizes too: the config needs its fit beside it). Each start is timed from the
moment the process was started to its first line of output and to its first `train` line in metrics.jsonl (step 1
done, its loss read back), then ended. Meanwhile a thread of the process samples its main thread's stack every few
milliseconds and files each sample under a phase (PHASES: the first whose code is on the stack, so a lazy import
counts as imports wherever it happens); the rows add up to step 1 done. Each --tree is an lmlab source tree (a
checkout's root) put first on PYTHONPATH (the working directory left off sys.path: `python -P`), so two versions can
be compared in one sitting: the trees take turns in every round, so a change in the machine's load hits them alike.
Without --tree, the installed lmlab runs. Prints the median of each figure over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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

# A phase, then the code that puts a sample in it: a function of a file, or any of it ("").
PHASES = {
    "first step": [("lmlab/train/loop.py", "_loop")],
    "imports": [("<frozen importlib._bootstrap>", "_find_and_load")],
    "peak and dtype": [("lmlab/core/peak.py", "")],
    "sizing": [("lmlab/experiments/sizing.py", "")],  # its timing of sizes too
    "budget's timing": [("lmlab/train/timing.py", ""), ("lmlab/train/budget.py", "")],
    "machine's choices": [("lmlab/core/machine.py", ""), ("lmlab/train/attention.py", ""),
                          ("lmlab/core/threads.py", ""), ("lmlab/core/cache.py", "")],
    "data checks": [("lmlab/data/", "")],
    "run folder": [("lmlab/run/", "")],
    "model and optimizer": [("lmlab/model/", ""), ("lmlab/train/optim.py", ""), ("lmlab/train/step.py", "")],
}
OTHER = "the rest (interpreter, config, lines)"
# Runs in the timed process: its phase as it changes, `perf_counter phase` a line (the clock is the machine's).
SAMPLER = """
import runpy, sys, threading, time
PHASES, OTHER, out = {phases!r}, {other!r}, open({path!r}, "w", buffering=1)
main = threading.main_thread().ident
def phase():
    frame, seen = sys._current_frames().get(main), []
    while frame is not None:
        seen.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    for name, rules in PHASES.items():
        if any(part in file and fn in ("", code) for file, code in seen for part, fn in rules):
            return name
    return OTHER
def sample():
    last = None
    while True:
        now = phase()
        if now != last:
            out.write(f"{{time.perf_counter()}} {{now}}\\n")
            last = now
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ["lmlab", *sys.argv[1:]]
runpy.run_module("lmlab", run_name="__main__", alter_sys=True)
"""
PYTHON = "python, until the sampler"


def timed_start(command: list[str], env: dict[str, str], run: Path, phases: Path) -> dict[str, float]:
    """Seconds from starting `command` (lmlab's arguments) to its first line of output and to its first train
    line, and by phase to that; the process is then killed."""
    seen: dict[str, float] = {}
    code = SAMPLER.format(phases=PHASES, other=OTHER, path=str(phases))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-P", "-c", code, *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def read() -> None:
        output = proc.stdout.readline()
        seen.setdefault("first line", time.perf_counter() - started)
        seen["output"] = output + proc.stdout.read()

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None and "train" not in seen:
        for event in RunDir(run).events():
            seen.setdefault(event["event"], time.perf_counter() - started)
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    if "train" not in seen:
        raise SystemExit(f"{' '.join(command)} ended before its first step:\n{seen['output']}")
    return {"first line": seen["first line"], **by_phase(phases.read_text(), started, started + seen["train"]),
            "step 1 done": seen["train"]}


def by_phase(lines: str, started: float, done: float) -> dict[str, float]:
    """Seconds in each phase from the sampler's lines, from `started` (the process's start) to `done`."""
    marks = [(float(t), name) for t, _, name in (line.partition(" ") for line in lines.splitlines())]
    spent = dict.fromkeys([PYTHON, *PHASES, OTHER], 0.0)
    spent[PYTHON] = marks[0][0] - started
    for (began, name), (ended, _) in zip(marks, [*marks[1:], (done, "")]):
        spent[name] += max(0.0, min(ended, done) - began)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--budget", help="train with this --budget (its timing and plan are start-up's)")
    parser.add_argument("--size", help="train with this --size (auto, with --budget: its timing of sizes is "
                                       "start-up's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="an lmlab source tree to run (repeatable)")
    args = parser.parse_args()
    prepare(["shakespeare"], "char", out_dir=Path(load_config(Path(args.config)).data.dataset).parent)
    trees, starts = args.tree or [""], ("first run", "second run")
    settings = ["train.log_interval=1", "train.eval_interval=1000"]
    times: dict[tuple[str, str], list[dict[str, float]]] = {(t, s): [] for t in trees for s in starts}
    progress = ItemProgress(console, args.repeats * len(trees))
    with tempfile.TemporaryDirectory(dir=".") as runs, LoadMeter() as meter:
        for round_ in range(args.repeats):
            for i, tree in enumerate(trees):
                progress.start(f"{tree or 'installed'}, round {round_ + 1}")
                env = {**os.environ, "XDG_CACHE_HOME": str(Path(runs) / f"cache-{round_}-{i}")}
                env |= {"PYTHONPATH": str(Path(tree).resolve())} if tree else {}
                for start in starts:
                    run = Path(runs) / f"{round_}-{i}-{start[:5]}"
                    command = ["train", args.config, "--run", str(run), "--device", "cpu",
                               *(["--budget", args.budget] if args.budget else []),
                               *(["--size", args.size] if args.size else []),
                               *(arg for s in settings for arg in ("--set", s))]
                    times[tree, start].append(timed_start(command, env, run, Path(runs) / "phases"))
    options = (f" --budget {args.budget}" if args.budget else "") + (f" --size {args.size}" if args.size else "")
    table = Table(title=f"`lmlab train {args.config}{options}`: seconds from the command, median of {args.repeats}")
    table.add_column("")
    columns = list(times[trees[0], starts[0]][0])
    for tree, start in times:
        table.add_column(f"{tree or 'installed'}, {start}" if args.tree else start, justify="right")
    for column in columns:
        cells = [f"{statistics.median(r[column] for r in rows):.2f}" for rows in times.values()]
        table.add_row(column if column in ("first line", "step 1 done") else f"  {column}", *cells)
    console.print(table)
    console.print(json.dumps({f"{t}|{s}": rows for (t, s), rows in times.items()}), style="dim", highlight=False)
    warning = busy_warning("the starts", meter.load, "they read slow")
    if warning:
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
