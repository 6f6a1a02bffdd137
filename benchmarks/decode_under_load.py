"""Decoding when a CPU hog arrives mid-decode: tokens/s before it and after it, with the threads fixed at the start
(lmlab before the decoders heard the load) and with the training loop's mid-run rule hearing each step
(lmlab.core.threads.ThreadChooser.stepped, as sample, answer, lmlab.Run and serve decode now).

    python -m benchmarks.decode_under_load [--seconds 15] [--repeats 2] [--hogs 1]   (from the repository root)

The demo-size model (benchmarks/decode_speed.py's "demo" shape, random weights), batch-1 greedy, eager and compiled
(one AOTInductor step, built once, for every core with Inductor's dynamic threads: lmlab.inference.compiled), in one
process starting on every core. Each case decodes for --seconds, then --hogs processes spinning
(`python -c "while True: pass"`, started through a shell so they are no child of this process, which the load meter
would count as its own) join for --seconds more. The cases alternate, so a slow moment of the machine hits all, and
each figure is the best of --repeats. The first half is only as quiet as the machine: each row says what other
processes took of the cores in each half (the hogs included in the second).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import torch
from rich.table import Table

from benchmarks.decode_speed import SHAPES
from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, cores
from lmlab.core.config import SamplingParams
from lmlab.core.progress import ItemProgress
from lmlab.core.threads import Choice, Heard, ThreadChooser
from lmlab.inference.compiled import compile_step
from lmlab.inference.decode import Decoder, Sequence
from lmlab.model import build_model

DEMO = SHAPES["demo (4L/256, ctx 128)"]


def spin(hogs: int) -> list[int]:
    """`hogs` spinning processes, no descendants of this one; their pids."""
    loop = f'"{sys.executable}" -c "while True: pass" >/dev/null 2>&1'
    started = subprocess.run(["sh", "-c", f"for i in $(seq {hogs}); do {loop} & echo $!; done"],
                             capture_output=True, text=True, check=True)
    return [int(pid) for pid in started.stdout.split()]


def decode_for(decoder: Decoder, seq: Sequence, seconds: float) -> tuple[float, float | None]:
    """Tokens/s decoding for `seconds`, and the share of the cores other processes took meanwhile."""
    tokens, began = 0, time.perf_counter()
    with LoadMeter() as meter:
        while time.perf_counter() - began < seconds:
            decoder.step()
            tokens += 1
    return tokens / (time.perf_counter() - began), meter.load.others if meter.load else None


def case(model: torch.nn.Module, step, hears: bool, seconds: float, hogs: int) -> dict:
    """One decode: quiet, then beside the hogs; with `hears`, each step goes to the thread rule."""
    changes: list[Choice] = []
    chooser = ThreadChooser(0, "OMP_NUM_THREADS")
    chooser.start(torch.device("cpu"))  # every core, as a quiet start chooses
    decoder = Decoder(model, 1, torch.float32, step, Heard(chooser, changes.append) if hears else None)
    seq = Sequence([0], SamplingParams(max_new_tokens=10 ** 9, temperature=0))
    decoder.join(seq)
    before, quiet_others = decode_for(decoder, seq, seconds)
    pids = spin(hogs)
    try:
        after, busy_others = decode_for(decoder, seq, seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    torch.set_num_threads(chooser.before)
    return {"before": before, "after": after, "others": (quiet_others, busy_others),
            "threads": " ".join(f"{c.threads} ({c.reason})" for c in changes) or "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of each half")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=1)
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        raise SystemExit("unset OMP_NUM_THREADS: it fixes the threads, which the rule then leaves alone.")
    torch.manual_seed(0)
    model = build_model(DEMO).eval()
    with console.status("Compiling the decode step..."):
        steps = {"eager": None, "compiled": compile_step(model, 1, torch.float32)}
    cases = [(path, hears) for path in steps for hears in (False, True)]
    progress, best = ItemProgress(console, len(cases) * args.repeats), {}
    for repeat in range(args.repeats):
        for path, hears in cases:
            progress.start(f"{path}, {'the rule hears the load' if hears else 'threads fixed'}, round {repeat + 1}")
            got = case(model, steps[path], hears, args.seconds, args.hogs)
            console.print(f"    {got['before']:,.0f} -> {got['after']:,.0f} tok/s, threads {got['threads']}",
                          highlight=False)
            kept = best.get((path, hears))
            if kept is None or got["after"] > kept["after"]:
                best[path, hears] = {**got, "best_before": max(got["before"], kept["best_before"] if kept else 0)}
            else:
                kept["best_before"] = max(kept["best_before"], got["before"])
    table = Table(title=f"Demo-size batch-1 greedy decoding on {len(cores())} cores from {len(cores())} threads: "
                        f"{args.seconds:g} s, then {args.seconds:g} s beside {args.hogs} CPU hog(s) (best of "
                        f"{args.repeats}; torch {torch.__version__})")
    for column in ("step", "threads", "tok/s before the hog", "tok/s with the hog", "threads changes",
                   "others' CPU before / with"):
        table.add_column(column, justify="left" if column in ("step", "threads", "threads changes") else "right")
    for (path, hears), got in best.items():
        others = " / ".join("-" if o is None else f"{100 * o:.0f}%" for o in got["others"])
        table.add_row(path, "heard (after)" if hears else "fixed (before)", f"{got['best_before']:,.0f}",
                      f"{got['after']:,.0f}", got["threads"], others)
    console.print(table)


if __name__ == "__main__":
    main()
