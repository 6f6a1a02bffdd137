"""lmlab against nanoGPT's own train.py, on this machine and lmlab's prepared Shakespeare split, in one run.

    python benchmarks/nanogpt_side_by_side.py --nanogpt PATH [--budget 300] [--lmlab-budgets 30,45,60]
        [--short-preset configs/shakespeare-char-speedrun-cpu.toml]

PATH is a checkout of github.com/karpathy/nanoGPT: its train.py, model.py, configurator.py and config/ run as they
are, from a copy in a scratch folder (train.py reads its data and configurator.py from the working directory),
nothing of it rewritten. nanoGPT trains on lmlab's split of data/shakespeare-char (its train.bin and val.bin are
nanoGPT's format already: uint16 tokens), with its README's CPU settings for Shakespeare-char:

    train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
             --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
             --lr_decay_iters=2000 --dropout=0.0

first as written (2,000 iterations), then given --budget seconds: max_iters set to the iterations that fit (from the
first run's step time and overhead, its 9 evaluations kept: eval_interval = max_iters / 8), its LR decayed to the end
(lr_decay_iters = max_iters). Each run keeps its last weights (always_save_checkpoint), which are scored on the
whole val split by lmlab's scorer (`evals.evaluate.evaluate_split`, through nanoGPT's own GPT.forward): the same
windows lmlab's `eval` cuts at the model's context length.

lmlab trains `make demo`'s command (configs/shakespeare-char-modern-cpu.toml --size auto) with --budget, and each of
--lmlab-budgets with --short-preset (by default the same preset; the speedrun preset is lmlab's for budgets under a
minute); each last checkpoint is scored on the whole split the same way. The runs take turns (nanoGPT's
2,000 iterations, lmlab's short budgets, nanoGPT's budget, lmlab's budget), so a change in the machine's load hits
both. Every wall time is the process's, start-up and exit included.

Prints the host's matmul peak, a table of the runs, and the issue's two targets: lmlab's val at --budget at least
0.15 below nanoGPT's, and nanoGPT's 2,000-iteration val reached by lmlab within 1/6 of nanoGPT's time.

    python benchmarks/nanogpt_side_by_side.py --gpu [--nanogpt PATH]     # `make gpu-nanogpt`; PATH: $NANOGPT_DIR

On a GPU (issue 80), in one sitting, taking turns: nanoGPT's train.py with its README's GPU run of Shakespeare-char
(`config/train_shakespeare_char.py`, compile on: train.py's default) and lmlab's same recipe
(configs/shakespeare-char.toml), both on lmlab's split; then GPT-2 small's training tokens/s by nanoGPT's bench.py
(its defaults: micro-batch 12, compiled, bf16; random tokens, `--real_data=False`) and by lmlab's `bench` at the same
micro-batch. Prints each side's steps/s, tokens/s and wall time, the time each took to nanoGPT's final val (process
start to the evaluation that reached it), and the issue's target: lmlab at most half of nanoGPT's. Each of the four
is a process group of its own, killed whole at its cap (Sides: 170 s for each training run, 75 s for each bench, 490
s in all: a lent GPU's second command of at most SECONDS), printing or not; one stopped at its cap is measured on what
it printed, one that fails is a row naming it, and the other side runs all the same. `--dry-run` does the same on the
CPU with tiny shapes and few steps (nanoGPT's own `--device=cpu --compile=False` and sizes), which the test suite runs
on a stand-in of nanoGPT's CLI; `lmlab_gpu` is what `make gpu-report`'s Shakespeare part calls.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cpu_speedrun import DEMO, measure
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config_toml import load_config
from lmlab.core.peak import peak_flops
from lmlab.core.progress import ItemProgress
from lmlab.data.prepare import prepare
from lmlab.data.shards import open_tokens, read_meta
from lmlab.evals.evaluate import evaluate_split
from lmlab.run.rundir import RunDir

README_ITERS = 2000
README_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--dropout=0.0"]
EVALS = 8  # intervals between nanoGPT's evaluations in its README run: 2,000 / eval_interval 250
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)
EVAL_LINE = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", re.M)


def scratch_copy(checkout: Path, dataset: Path, scratch: Path) -> None:
    """nanoGPT's files in `scratch`, with lmlab's prepared split as its dataset `lmlab_char`."""
    for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):
        if not (checkout / name).is_file():
            raise SystemExit(f"--nanogpt {checkout} has no {name}: pass a checkout of github.com/karpathy/nanoGPT.")
    shutil.copytree(checkout, scratch, ignore=shutil.ignore_patterns(".git", "data", "assets"))
    data = scratch / "data" / "lmlab_char"
    data.mkdir(parents=True)
    meta = read_meta(dataset)
    for split in ("train", "val"):
        np.asarray(open_tokens(dataset, split, meta["dtype"])[:], dtype=np.uint16).tofile(data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)


def nanogpt(scratch: Path, name: str, iters: int) -> dict[str, float]:
    """nanoGPT's train.py for `iters` iterations, in its own process: wall time, step time, its own last val."""
    out = scratch / f"out-{name}"
    command = [sys.executable, "train.py", *README_ARGS, "--dataset=lmlab_char", f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", f"--eval_interval={iters // EVALS}", "--always_save_checkpoint=True",
               f"--out_dir={out.name}"]
    with LoadMeter() as meter:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"nanoGPT's train.py failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr}")
    warning = busy_warning(f"nanoGPT {name}", meter.load, "its steps read slower than the machine's")
    if warning:
        console.print(warning, style="yellow", markup=False)
    evals = {int(step): float(val) for step, val in EVAL_LINE.findall(done.stdout)}
    # An iteration that follows an evaluation is timed with it: the median is a plain step's.
    step = statistics.median(float(ms) for _, ms in ITER_LINE.findall(done.stdout)) / 1000
    return {"wall": wall, "steps": iters, "step": step, "rate": 12 * 64 / step, "estimate": evals[iters],
            "full": whole_split(scratch, out / "ckpt.pt")}


def whole_split(scratch: Path, checkpoint: Path) -> float:
    """The val loss of nanoGPT's checkpoint on every window of lmlab's val split, by lmlab's scorer."""
    sys.path.insert(0, str(scratch))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py, from the scratch copy
    finally:
        sys.path.remove(str(scratch))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    tokens = np.fromfile(scratch / "data" / "lmlab_char" / "val.bin", dtype=np.uint16)
    # With targets, nanoGPT's forward gives the logits of every position (without, the last one's only).
    with torch.no_grad():
        return evaluate_split(model, tokens, 1.0, 32, torch.device("cpu"), torch.float32,
                              forward=lambda x: model(x, x.contiguous()))["loss"]


# --- on a GPU: nanoGPT's own GPU run of Shakespeare-char and bench.py, beside lmlab's --------------------------------
ROOT = Path(__file__).resolve().parent.parent
RECIPE = "configs/shakespeare-char.toml"  # lmlab's preset of nanoGPT's config/train_shakespeare_char.py
BENCH_BATCH = 12  # bench.py's micro-batch
Row = tuple[str, str, str]


@dataclass(frozen=True)
class Sides:
    """What each side runs with: the real sitting's (nanoGPT's and lmlab's configs as they are, on CUDA) or the dry
    run's (tiny shapes on the CPU, set through each tool's own options), and the seconds each process may take."""

    device: str
    nanogpt: list[str]  # train.py's options after its config file
    lmlab: list[str]  # --set overrides of RECIPE
    bench: list[str]  # bench.py's options
    gpt2: list[str]  # --set overrides of configs/gpt2-small.toml for lmlab's bench
    train_seconds: float = 240.0
    bench_seconds: float = 120.0


# Each process's cap: nanoGPT's run took about 3 minutes on an A100 (its README), lmlab's 105 s on an H100.
GPU_SIDES = Sides("cuda", [], [], ["--real_data=False"], ["train.grad_accum_steps=1"], train_seconds=170,
                  bench_seconds=75)
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}
DRY_SIDES = Sides("cpu", ["--device=cpu", "--compile=False", "--max_iters=20", "--lr_decay_iters=20",
                          "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--batch_size=8",
                          *(f"--{k}={v}" for k, v in TINY.items())],
                  [*(f"model.{k}={v}" for k, v in TINY.items()), "train.max_iters=20", "train.eval_interval=10",
                   "train.eval_iters=2", "train.batch_size=8", "train.warmup_iters=5"],
                  ["--real_data=False", "--device=cpu", "--compile=False", "--batch_size=1", "--block_size=32"],
                  ["train.grad_accum_steps=1", "model.vocab_size=512", *(f"model.{k}={v}" for k, v in TINY.items())],
                  train_seconds=120.0, bench_seconds=120.0)


@dataclass
class Ran:
    """A child's output, when each of its evaluation lines (`step N: ... val loss V`) was printed (seconds from its
    start, by step), its wall time, and whether it was stopped at its cap."""

    text: str
    stamps: dict[int, float]
    wall: float
    capped: bool


def timed_lines(what: str, command: list[str], cwd: Path, seconds: float) -> Ran:
    """Run `command` (`what` names it) in a process group of its own, killed whole at `seconds` whether it prints or
    not (a compile that hangs, a grandchild that holds its output). SystemExit naming it where it fails."""
    started, stopped = time.perf_counter(), threading.Event()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "COLUMNS": "200"})  # tables unwrapped

    def stop() -> None:
        stopped.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, stop)
    timer.start()
    lines, stamps = [], {}
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line)
            if found := EVAL_LINE.match(line):
                stamps[int(found[1])] = time.perf_counter() - started
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted here: its group goes too
            stop()
    text = "".join(lines)
    if code and not stopped.is_set():
        last = (text.strip().splitlines() or ["no output"])[-1]
        console.print(f"{what}: {shlex.join(command)}\n{text[-3000:]}", markup=False, highlight=False)
        raise SystemExit(f"{what} failed with status {code} ({last.strip()[:200]})")
    return Ran(text, stamps, time.perf_counter() - started, stopped.is_set())


def nanogpt_gpu(scratch: Path, sides: Sides) -> dict[str, float]:
    """nanoGPT's train.py with its Shakespeare-char config, as its README runs it on a GPU, on lmlab's split."""
    ran = timed_lines("nanoGPT's train.py", [sys.executable, "train.py", "config/train_shakespeare_char.py",
                                             "--dataset=lmlab_char", "--out_dir=out-gpu", *sides.nanogpt], scratch,
                      sides.train_seconds)
    evals = {int(step): float(val) for step, val in EVAL_LINE.findall(ran.text)}
    times = [float(ms) for _, ms in ITER_LINE.findall(ran.text)]
    if not evals or not times:
        raise SystemExit(f"nanoGPT's train.py was stopped at its {sides.train_seconds:.0f} s cap before its first "
                         "evaluation")
    step, last = statistics.median(times) / 1000, max(evals)
    tokens = int(_option(sides.nanogpt, "batch_size", 64)) * int(_option(sides.nanogpt, "block_size", 256))
    return {"wall": ran.wall, "steps": last, "steps_s": 1 / step, "rate": tokens / step, "val": evals[last],
            "reached": ran.stamps[last], "capped": ran.capped}


def _option(options: list[str], name: str, default: int) -> str:
    return next((o.split("=", 1)[1] for o in options if o.startswith(f"--{name}=")), str(default))


def lmlab_gpu(dataset: Path, run: Path, sides: Sides, target: float, seconds: float | None = None) -> dict[str, float]:
    """lmlab's recipe in its own process, for at most `seconds` (the sides' cap by default; what it logged before a
    cap stopped it is read all the same); when its evaluation first reached `target`, from the process's start."""
    sets = [arg for o in [f"data.dataset={dataset}", *sides.lmlab] for arg in ("--set", o)]
    cap = sides.train_seconds if seconds is None else seconds
    ran = timed_lines(f"lmlab train {RECIPE}", [sys.executable, "-P", "-m", "lmlab", "train", RECIPE, "--run",
                                                str(run), "--device", sides.device, *sets], ROOT, cap)
    events = RunDir(run).events()
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    if not train:
        raise SystemExit(f"lmlab train {RECIPE} " + (f"was stopped at its {cap:.0f} s cap before its first logged "
                                                     "step" if ran.capped else "logged no step"))
    end = next((e for e in events if e["event"] == "end"), train[-1])
    startup = ran.wall - end["elapsed"] if not ran.capped else 0.0  # the process's time outside its training clock
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    steady = [e for e in train if e["step"] > 1] or train
    rate = statistics.median(e["tokens_per_sec"] for e in steady)
    mfus = [e["mfu"] for e in steady if e.get("mfu") is not None]
    cfg = load_config(ROOT / RECIPE, sides.lmlab)
    return {"wall": ran.wall, "steps": end["step"], "steps_s": rate / (cfg.train.batch_size * cfg.model.block_size),
            "rate": rate, "val": evals[-1]["val_loss"] if evals else math.nan,
            "mfu": statistics.median(mfus) if mfus else math.nan,
            "reached": startup + hit["elapsed"] if hit else math.nan, "capped": ran.capped}


def bench_pair(scratch: Path, sides: Sides) -> tuple[float, float]:
    """GPT-2 small's training tokens/s at bench.py's micro-batch: nanoGPT's bench.py, then lmlab's `bench`, each a
    process stopped at its cap."""
    ran = timed_lines("nanoGPT's bench.py", [sys.executable, "bench.py", *sides.bench], scratch, sides.bench_seconds)
    ms = re.search(r"time per iteration: ([\d.]+)ms", ran.text)
    batch = int(_option(sides.bench, "batch_size", BENCH_BATCH))
    theirs = batch * int(_option(sides.bench, "block_size", 1024)) / (float(ms[1]) / 1000) if ms else math.nan
    sets = [arg for o in sides.gpt2 for arg in ("--set", o)]
    ours = timed_lines("lmlab bench configs/gpt2-small.toml", [
        sys.executable, "-P", "-m", "lmlab", "bench", "configs/gpt2-small.toml", "--batch-sizes", str(batch),
        "--steps", "10", "--device", sides.device, *sets], ROOT, sides.bench_seconds)
    row = re.search(rf"^│\s*{batch}\s*│\s*([\d,]+)\s*│", ours.text, re.M)  # its table's tokens/s
    return theirs, float(row[1].replace(",", "")) if row else math.nan


NO_CHECKOUT = "not run: set NANOGPT_DIR to a checkout of github.com/karpathy/nanoGPT"
SECONDS = 540  # a lent GPU's command (`make gpu-nanogpt`): the side by side's processes' caps add up to at most this


def gpu_rows(checkout: Path | None, dataset: Path, runs: Path, sides: Sides) -> list[Row]:
    """The side-by-side rows of Shakespeare-char, taking turns (nanoGPT's run, then lmlab's); a side that fails is a
    row saying so, and the other is run all the same. Without a checkout, a row saying what to set."""
    if checkout is None:
        return [("nanoGPT's train.py", NO_CHECKOUT, "")]
    theirs_what, ours_what = "nanoGPT train.py, config/train_shakespeare_char.py (compile on)", f"lmlab, {RECIPE}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            scratch_copy(checkout, dataset, Path(folder) / "nanogpt")
            theirs = nanogpt_gpu(Path(folder) / "nanogpt", sides)
        rows = [side(theirs_what, theirs)]
    except SystemExit as err:
        theirs, rows = {}, [(theirs_what, str(err), "")]
    try:
        ours = lmlab_gpu(dataset, runs / f"side-by-side-{time.strftime('%Y%m%d-%H%M%S')}", sides,
                         theirs.get("val", -math.inf))
    except SystemExit as err:
        return [*rows, (ours_what, str(err), "")]
    if not theirs:
        return [*rows, side(ours_what, ours)]
    share = ours["reached"] / theirs["reached"]
    reached = (f"nanoGPT {theirs['reached']:.0f} s, lmlab {ours['reached']:.0f} s ({share:.2f} of it)"
               if share == share else f"nanoGPT {theirs['reached']:.0f} s; lmlab did not reach it")
    final = "last val, as its cap stopped it," if theirs["capped"] else "final val"
    return [*rows, side(ours_what, ours), (f"time to nanoGPT's {final} {theirs['val']:.4f}, from the process's start",
                                           reached, "lmlab at most half of nanoGPT's")]


def bench_row(checkout: Path | None, dataset: Path, sides: Sides) -> Row:
    """GPT-2 small's tokens/s by nanoGPT's bench.py, then lmlab's `bench`, at bench.py's micro-batch."""
    what = f"GPT-2 small tok/s, micro-batch {_option(sides.bench, 'batch_size', BENCH_BATCH)}, compiled"
    if checkout is None:
        return what, NO_CHECKOUT, ""
    with tempfile.TemporaryDirectory() as folder:
        scratch_copy(checkout, dataset, Path(folder) / "nanogpt")
        try:
            theirs, ours = bench_pair(Path(folder) / "nanogpt", sides)
        except SystemExit as err:
            return what, str(err), ""
    return what, f"nanoGPT bench.py {theirs:,.0f}, lmlab bench {ours:,.0f} ({ours / theirs:.2f}x)", ""


def side(what: str, r: dict[str, float]) -> Row:
    """A run's row: its steps/s, tokens/s, MFU where known, and its last val; where its cap stopped it, so said."""
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu", math.nan) == r.get("mfu", math.nan) else ""
    end = (f"stopped at its cap at step {r['steps']:,}, val {r['val']:.4f}" if r["capped"] else
           f"final val {r['val']:.4f} at step {r['steps']:,}")
    return what, f"{r['steps_s']:,.1f} steps/s, {r['rate']:,.0f} tok/s{mfu}; {end}; {r['wall']:.0f} s wall", ""


def gpu_main(checkout: Path, out: Path, dry_run: bool) -> None:
    sides = DRY_SIDES if dry_run else GPU_SIDES
    console.print(f"nanoGPT's train.py and lmlab's recipe {sides.train_seconds:.0f} s each at most, bench.py and "
                  f"lmlab's bench {sides.bench_seconds:.0f} s each: {caps(sides):.0f} s of {SECONDS}", highlight=False)
    dataset = Path(load_config(ROOT / RECIPE).data.dataset)
    if not (dataset / "meta.json").exists():
        prepare(["shakespeare"], "char", out_dir=dataset.parent)
    rows = gpu_rows(checkout, dataset.resolve(), out, sides)
    rows.append(bench_row(checkout, dataset.resolve(), sides))
    table = Table(title="nanoGPT's own train.py and bench.py beside lmlab, on this machine, taking turns")
    for column in ("what", "result", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def caps(sides: Sides) -> float:
    """The seconds the side by side's processes may take in all (SECONDS at most on a GPU)."""
    return 2 * sides.train_seconds + 2 * sides.bench_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT_DIR"),
                        help="a checkout of github.com/karpathy/nanoGPT (default: $NANOGPT_DIR)")
    parser.add_argument("--gpu", action="store_true", help="nanoGPT's GPU run and bench.py beside lmlab's, on CUDA")
    parser.add_argument("--dry-run", action="store_true", help="--gpu's steps with tiny shapes on the CPU")
    parser.add_argument("--budget", type=int, default=300, help="seconds each side trains for (default: 300)")
    parser.add_argument("--lmlab-budgets", default="30,45,60",
                        help="shorter lmlab budgets, seconds, comma-separated: which reaches nanoGPT's 2,000-"
                        "iteration val, and how soon")
    parser.add_argument("--short-preset", default=DEMO, help="the preset the shorter budgets train, with --size auto "
                        f"(default: {DEMO}, make demo's)")
    parser.add_argument("--out", type=Path, default=Path(f"runs/nanogpt-side-by-side-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = parser.parse_args()
    if args.nanogpt is None:
        parser.error("--nanogpt (or NANOGPT_DIR) is needed: a checkout of github.com/karpathy/nanoGPT")
    if args.gpu or args.dry_run:
        return gpu_main(args.nanogpt.resolve(), args.out.resolve(), args.dry_run)
    dataset = Path(load_config(Path(DEMO)).data.dataset)
    prepare(["shakespeare"], "char", out_dir=dataset.parent)
    scratch = args.out / "nanogpt"
    scratch_copy(args.nanogpt.resolve(), dataset, scratch)
    peak = peak_flops(torch.device("cpu"), torch.float32)
    console.print(f"host: {peak.flops / 1e12:.3f} TFLOP/s fp32 ({peak.describe()}), {torch.get_num_threads()} "
                  "threads", highlight=False)
    short = [int(b) for b in args.lmlab_budgets.split(",")]
    progress, rows = ItemProgress(console, 3 + len(short)), {}

    progress.start(f"nanoGPT, its README's {README_ITERS:,} iterations")
    rows["nanoGPT, README"] = readme = nanogpt(scratch, "readme", README_ITERS)
    for budget in short:
        progress.start(f"lmlab {args.short_preset} --budget {budget}s")
        rows[f"lmlab {budget} s"] = measure(args.short_preset, budget, args.out / f"lmlab-{budget}s",
                                            ["--size", "auto"])
    overhead = readme["wall"] - README_ITERS * readme["step"]  # start-up, evaluations and saves
    iters = int((args.budget - overhead) / readme["step"]) // EVALS * EVALS
    progress.start(f"nanoGPT, {iters:,} iterations (what fits {args.budget} s)")
    rows[f"nanoGPT {args.budget} s"] = nano = nanogpt(scratch, "budget", iters)
    progress.start(f"lmlab --budget {args.budget}s")
    rows[f"lmlab {args.budget} s"] = ours = measure(DEMO, args.budget, args.out / f"lmlab-{args.budget}s",
                                                     ["--size", "auto"])

    short_preset = "" if args.short_preset == DEMO else f"; under {args.budget} s, {args.short_preset}"
    table = Table(title=f"nanoGPT's train.py and `make demo`'s recipe on this CPU{short_preset} ({args.out})")
    for column in ("run", "wall s", "steps", "tokens/s", "val (run's own)", "val (whole split)"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['wall']:.1f}", f"{r['steps']:,}", f"{r['rate']:,.0f}", f"{r['estimate']:.4f}",
                      f"{r['full']:.4f}")
    console.print(table)
    gap = nano["full"] - ours["full"]
    console.print(f"at {args.budget} s: lmlab {ours['full']:.4f}, nanoGPT {nano['full']:.4f}: {gap:+.4f} below "
                  f"(target: at least 0.15 below, {'met' if gap >= 0.15 else 'MISSED'})", highlight=False)
    hits = [b for b in short + [args.budget] if rows[f"lmlab {b} s"]["full"] <= readme["full"]]
    if hits:
        share = rows[f"lmlab {min(hits)} s"]["wall"] / readme["wall"]
        console.print(f"nanoGPT's {README_ITERS:,}-iteration val {readme['full']:.4f} took it {readme['wall']:.1f} s;"
                      f" lmlab reached it within a {min(hits)} s budget: {share:.2f} of that time (target: at most "
                      f"{1 / 6:.2f}, {'met' if share <= 1 / 6 else 'MISSED'})", highlight=False)
    else:
        console.print(f"no lmlab budget tried reached nanoGPT's {README_ITERS:,}-iteration val {readme['full']:.4f}",
                      highlight=False)


if __name__ == "__main__":
    main()
