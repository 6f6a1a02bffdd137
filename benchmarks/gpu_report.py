"""Everything lmlab promises on a GPU, measured on the one it finds, as one Markdown table, then the first hour's
checklist of what only a GPU can settle (docs/reference/performance.md, "The first hour on a GPU"): the lease check,
one command for one lent GPU.

    python benchmarks/gpu_report.py [--out FILE.md] [--data DIR]      # `make gpu-report`; run from the repo root
    python benchmarks/gpu_report.py --dry-run                         # the same parts, tiny, on the CPU (the tests)
    python benchmarks/gpu_report.py --stages decode gpt2              # some parts only (a second lease)

The default is all of it, its parts in this order, each a process group of its own stopped whole at its cap (PARTS;
the caps add up to at most SECONDS, 9 minutes, which --dry-run prints before it starts), and the report written as
each part ends, so a lease cut short keeps what finished:
- the peak FLOP/s MFU divides by, beside what a matmul reaches;
- greedy decoding at batch 1 and 8, eager and with the CUDA-graph step every command chooses on a GPU, of the
  demo-size model and of GPT-2 small's shape;
- the Shakespeare-char recipe (configs/shakespeare-char.toml): steps/s, tokens/s, MFU, its time to val 1.50 and to
  nanoGPT's val, in steps and in wall time (what it logged before its cap, where the cap stops it);
- GPT-2 small (random tokens) compiled at micro-batch 16 and 32: tokens/s, MFU and memory;
- `make demo`'s own commands (its demo-commands target) on the GPU with a 1-minute budget;
- the CUDA tests, those of the paths a GPU user meets first (CUDA_PATHS), each path a row: every test marked `cuda`
  in tests/, found by its marker, not by name (what was decided before the cap is kept).
nanoGPT's own train.py and bench.py beside lmlab's are a second command of the same length (`make gpu-nanogpt`:
benchmarks/nanogpt_side_by_side.py --gpu); GPT-2 small eager, its largest micro-batch and its checkpoint's time are
`lmlab bench configs/gpt2-small.toml --set train.compile=false --find-max-batch --checkpoint`. The target column
holds the goals of issues 19, 80 and 90 for one H100 or H200.

It needs torch and lmlab's own dependencies, offline from a bundle (benchmarks/gpu_needs.py), which carries the
prepared data/shakespeare-char too. --dry-run walks the same parts with tiny shapes on the CPU, under the same caps:
it proves the script works, not the numbers; the CUDA-graph step is its CPU twin there (it captures nothing), and
the compiled GPT-2 rows time eager steps (tests/test_train_compile.py compiles training on the CPU). A part that
crashes, raises or runs out of time costs its own rows alone, said in a row.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from cuda_tests import CUDA_PATHS, WHY, cuda_tests, cuda_tests_found, on_paths
from nanogpt_side_by_side import DRY_SIDES, GPU_SIDES, RECIPE, Sides, lmlab_gpu, side, timed_lines

from lmlab.commands.common import console
from lmlab.core.config import SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.core.device import configure, no_gpu_reason, resolve_device
from lmlab.core.errors import UserError
from lmlab.core.machine import Machine
from lmlab.core.peak import autocast_dtype, measured_peak, peak_flops
from lmlab.data.prepare import prepare
from lmlab.experiments.bench import GPU_HEADROOM, BenchRow, bench_batch
from lmlab.inference.decode import Decoder, Sequence, Step, hold_weights
from lmlab.inference.generate import decode_dtype
from lmlab.inference.graphs import recorded
from lmlab.inference.steps import StepChoice, build_step, choose_step
from lmlab.model import build_model
from lmlab.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
Row = tuple[str, str, str]


@dataclass
class Scale:
    """How big each measurement is: the real report's, or the dry run's."""

    gpt2: list[str]  # overrides of configs/gpt2-small.toml
    batch_sizes: list[int]  # GPT-2 micro-batches timed compiled
    steps: int  # timed steps per micro-batch
    sides: Sides  # the Shakespeare-char recipe as benchmarks/nanogpt_side_by_side.py runs it
    new_tokens: int  # decoded per timing
    decoded: list[str]  # overrides of the decoded models' configs
    demo_budget: str  # `make demo`'s DEMO_BUDGET
    demo_sample: int  # and DEMO_SAMPLE, the characters it samples
    compile: bool = True  # build the compiled rows (the dry run's are built on the CPU by the tests they name)


FULL = Scale(gpt2=["train.grad_accum_steps=1"], batch_sizes=[16, 32], steps=10, sides=GPU_SIDES, new_tokens=500,
             decoded=[], demo_budget="1m", demo_sample=500)
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
# The demo's smallest budget that --size auto takes on a busy 2-core CPU is about 8 s: 15 s leaves it room.
DRY = Scale(gpt2=["train.grad_accum_steps=1", "model.vocab_size=512", *TINY_MODEL], batch_sizes=[2, 4], steps=2,
            new_tokens=20, decoded=TINY_MODEL, compile=False, sides=DRY_SIDES, demo_budget="30s",
            demo_sample=50)
DEMO_MODEL = "configs/shakespeare-char-modern-cpu.toml"  # `make demo`'s model: the decoding target's size
# The models decoded, by name: their config, and the vocabulary they decode (the char corpus's; GPT-2's).
DECODED = {"demo-size model": (DEMO_MODEL, 65), "GPT-2 small's shape": ("configs/gpt2-small.toml", 50304)}
DECODE_BATCHES = (1, 8)
NANOGPT_VAL = 1.4697  # the best val loss of nanoGPT's Shakespeare-char run, as its README gives it
# The dry run's compiled rows: Inductor's builds take most of its time on a CPU, and the suite builds both already.
NOT_BUILT = "not built in a dry run ({} on the CPU)"
GUIDE_BATCH = 16  # docs/guides/gpt2-small.md's micro-batch, on a 24 GB RTX 3090 or 4090
GUIDE_GPU_BYTES = 24 * 10**9
# What only a GPU can settle, each with how the report settles it (a CUDA path's tests, or a figure);
# docs/reference/performance.md lists the same.
CHECKLIST = {
    "CUDA-graph decode step equals eager": "graph decode",
    "FSDP with torch.compile trains": "FSDP with per-block compile",
    "the CUDA tests' tolerances hold": "tolerance",
    "GPT-2 small fits a 24 GB card at the guide's micro-batch": "memory",
}
MARGIN = 5.0  # seconds a part that runs a command under its cap keeps to read what it did and send its rows


@dataclass
class Context:
    """What a part of the report measures with, and what the parts note for the checklist: each CUDA test's outcome
    and recorded gaps (`results`), the memory GPT-2's micro-batches reserve compiled (`memory`)."""

    scale: Scale
    device: torch.device
    data: Path  # the Shakespeare-char dataset
    runs: Path  # where the Shakespeare and demo runs go
    seconds: float = math.inf  # the cap of the part that runs
    results: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


Part = Callable[[Context], list[Row]]


def environment(device: torch.device) -> list[Row]:
    if device.type != "cuda":
        return [("device", f"{device} (dry run: no GPU)", ""), ("torch", torch.__version__, "")]
    props = torch.cuda.get_device_properties(device)
    driver = "unknown (no nvidia-smi)"
    if shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.splitlines()[0].strip()
    return [("GPU", f"{props.name} (compute capability {props.major}.{props.minor}, "
                    f"{props.total_memory / 2**30:.1f} GiB)", ""),
            ("driver · torch · CUDA", f"{driver} · {torch.__version__} · {torch.version.cuda}", "")]


def cuda(ctx: Context) -> list[Row]:
    """The CUDA tests, those of the CUDA paths first, and a row for each path: its tests' outcomes."""
    found = cuda_tests_found()
    rows = [cuda_tests(ctx.results, found, ctx.seconds - MARGIN)]
    for path, words in CUDA_PATHS.items():
        said = []
        for name in [test.split("::")[-1] for test in found if path in on_paths(test)]:
            outcomes = {outcome for key, (outcome, _) in ctx.results.items() if key.split("[")[0] == name}
            said.append(f"{', '.join(sorted(outcomes)) or 'not run'} ({name})")
        rows.append((f"CUDA path: {path}", "; ".join(said) or f"no CUDA test's name holds {' and '.join(words)}",
                     "passed"))
    return rows + [(f"CUDA test failed: {name}", recorded[WHY].replace("|", "\\|"), "passed")
                   for name, (_, recorded) in ctx.results.items() if WHY in recorded]


def peak(ctx: Context) -> list[Row]:
    """The peak MFU divides by; a datasheet figure beside what a matmul reaches, which must not exceed it."""
    dtype = autocast_dtype(ctx.device, "auto")
    found = peak_flops(ctx.device, dtype)
    what = f"peak FLOP/s in {str(dtype).removeprefix('torch.')} (MFU's denominator)"
    if found.source == "measured matmul":
        return [(what, f"{found.flops / 1e12:,.1f} TFLOP/s ({found.describe()})", "")]
    matmul = measured_peak(ctx.device, dtype)
    result = f"{found.flops / 1e12:,.1f} TFLOP/s ({found.source}); a matmul reaches {matmul / 1e12:,.1f}"
    return [(what, result, "datasheet ≥ matmul")]


def decoding(name: str, graphs: bool, ctx: Context) -> list[Row]:
    """Greedy decoding of the model DECODED[name], at each of DECODE_BATCHES: with the CUDA-graph step every command
    chooses on a GPU (lmlab.inference.steps; on the CPU its twin, which captures nothing), or eagerly; the weights
    held in the decode dtype, as `lmlab sample` holds them."""
    device, new_tokens = ctx.device, ctx.scale.new_tokens
    path, vocab = DECODED[name]
    cfg = load_config(ROOT / path, [f"model.vocab_size={vocab}", *ctx.scale.decoded])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    choice = StepChoice("eager", "") if not graphs else choose_step(model, device, False) if device.type == "cuda" \
        else StepChoice("cuda graphs", "the CPU's twin: each bucket's step replayed into its buffers, none captured")
    # (on the CPU, where eager steps and their twin decode in fp32 whatever "auto" would choose, it is not timed)
    dtype = decode_dtype(device, autocast_dtype(device, "auto" if device.type == "cuda" else "float32"), False)
    hold_weights(model, dtype)
    started = time.perf_counter()
    twin = None if device.type == "cuda" else lambda: recorded
    step, used = build_step(choice, model, dtype, max(DECODE_BATCHES), twin)
    how = f"{used.describe()}, {time.perf_counter() - started:.1f} s to build" if graphs else "eager"
    rows, first = [], 0.0
    for batch in DECODE_BATCHES:
        rate = decode_rate(model, dtype, new_tokens, batch, step)
        first = first or rate
        target = ("≥ 2,000 tok/s" if name == "demo-size model" else "") if batch == 1 else "≥ 4x batch 1"
        rows.append((f"decoding, {name}, batch {batch}, {new_tokens} new tokens each, {how}",
                     f"{rate:,.0f} tok/s" + (f" ({rate / first:.1f}x batch 1)" if batch > 1 else ""),
                     target if graphs else ""))
    return rows


@torch.no_grad()
def decode_rate(model: torch.nn.Module, dtype: torch.dtype, new_tokens: int, batch: int,
                step: Step | None = None) -> float:
    """Tokens/s of greedy decoding, `batch` sequences together (after a short warm-up), with `step` or eagerly."""
    decoder = Decoder(model, batch, dtype, step)
    for count in (8, new_tokens):  # the first warms up
        seqs = [Sequence([row % 50], SamplingParams(max_new_tokens=count, temperature=0)) for row in range(batch)]
        for seq in seqs:
            decoder.join(seq)
        started = time.perf_counter()
        while not all(seq.exhausted for seq in seqs):
            decoder.step()
        if device_of(model).type == "cuda":
            torch.cuda.synchronize()
        for seq in seqs:
            decoder.leave(seq)
    return batch * new_tokens / (time.perf_counter() - started)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def shakespeare(ctx: Context) -> list[Row]:
    """The Shakespeare-char recipe, under the part's cap: its steps/s, tokens/s and MFU, its time to val 1.50 and to
    nanoGPT's val, and its final val (what it logged, where the cap stopped it first)."""
    if not (ctx.data / "meta.json").exists():
        prepare(["shakespeare"], "char", out_dir=ctx.data.parent)
    run = ctx.runs.resolve() / f"shakespeare-{time.strftime('%Y%m%d-%H%M%S')}"
    ran = lmlab_gpu(ctx.data.resolve(), run, ctx.scale.sides, NANOGPT_VAL, ctx.seconds - MARGIN)
    events = RunDir(run).events()
    end = next((e for e in events if e["event"] == "end"), None)
    final = (f"{end['best_val_loss']:.4f} (best, step {end['best_step']}), {end['elapsed']:.0f} s for {end['step']} "
             "steps" if end else f"not reached: the part's cap stopped it at step {ran['steps']}")
    what, said, _ = side(f"Shakespeare-char recipe ({RECIPE})", ran)
    return [(what, said, "2x 42319cc's steps/s (H200: 5,000 steps in 148 s)"),
            ("Shakespeare-char: time to val 1.50", time_to(events, 1.50), "under 60 s of steps"),
            (f"Shakespeare-char: time to nanoGPT's val {NANOGPT_VAL}", time_to(events, NANOGPT_VAL), ""),
            ("Shakespeare-char: final val", final, "")]


def time_to(events: list[dict], target: float) -> str:
    """When a run's val loss first reached `target`: in training steps alone, which the target is for, beside the
    wall clock, which adds the first step's compiling (its line's time past the steady steps) and the evaluations."""
    evals = [e for e in events if e["event"] == "eval"]
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    if hit is None:
        return "not reached"
    train = [e for e in events if e["event"] == "train"]
    steady = [(b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"]) for a, b in zip(train, train[1:])
              if not any(a["step"] < e["step"] <= b["step"] for e in evals)]
    per_step = sorted(steady)[len(steady) // 2] if steady else 0.0
    compiling = max(0.0, train[0]["elapsed"] - train[0]["step"] * per_step) if train else 0.0
    evaluating = sum(e["seconds"] for e in evals if e["step"] <= hit["step"])
    steps = hit["elapsed"] - evaluating - compiling
    return (f"{steps:.0f} s of steps (step {hit['step']}); {hit['elapsed']:.0f} s wall: +{compiling:.0f} s compiling "
            f"and warming up, +{evaluating:.0f} s evaluating")


def gpt2(batch: int, ctx: Context) -> list[Row]:
    """GPT-2 small compiled at the scale's `batch`-th micro-batch; the memory it reserves goes into `ctx.memory`. A
    dry run times it eager, as its compiled build belongs to the tests."""
    scale, device = ctx.scale, ctx.device
    size = scale.batch_sizes[batch]
    cfg = load_config(ROOT / "configs/gpt2-small.toml", [*scale.gpt2, f"train.compile={str(scale.compile).lower()}"])
    r = bench_batch(cfg, size, scale.steps, Machine.of(str(device), cfg.train.dtype, cfg.train.threads))
    if scale.compile and not r.out_of_memory:
        ctx.memory[f"micro-batch {size}"] = r.peak_memory
    said = timed(r, device) if scale.compile else \
        f"{NOT_BUILT.format('tests/test_train_compile.py compiles training')}; eager: {timed(r, device)}"
    return [(f"GPT-2 small, micro-batch {size}, compiled", said, "MFU ≥ 45% (bf16)")]


def timed(r: BenchRow, device: torch.device) -> str:
    kind = "reserved" if device.type == "cuda" else "peak RSS"
    return "out of memory" if r.out_of_memory else (
        f"{r.tokens_per_sec:,.0f} tok/s, MFU {'-' if r.mfu is None else f'{100 * r.mfu:.1f}%'}, "
        f"{r.peak_memory / 2**30:.1f} GiB {kind}" + (f" ({r.note})" if r.note else ""))


def demo(ctx: Context) -> list[Row]:
    """`make demo`'s commands (the Makefile's demo-commands) with the scale's budget on this device, lmlab run by this
    Python, where the dataset's data/ folder is (a dry run's scratch folder, configs/ linked into it)."""
    where = ctx.data.resolve().parent.parent
    if not (where / "configs").exists():
        (where / "configs").symlink_to(ROOT / "configs")
    run = ctx.runs.resolve() / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    what = f"make demo's commands, budget {ctx.scale.demo_budget}, --device {ctx.device.type}"
    ran = timed_lines(what, ["make", "-f", str(ROOT / "Makefile"), "--no-print-directory", "demo-commands",
                             f"LMLAB={shlex.join([sys.executable, '-P', '-m', 'lmlab'])}", f"DEVICE={ctx.device.type}",
                             f"DEMO_BUDGET={ctx.scale.demo_budget}", f"DEMO_SAMPLE={ctx.scale.demo_sample}",
                             f"DEMO_RUN={run}"], where, ctx.seconds - MARGIN)
    if ran.capped:
        return [(what, f"stopped at its {ctx.seconds - MARGIN:.0f} s cap", "done within the budget and a sample")]
    events = RunDir(run).events()
    end, model = next(e for e in events if e["event"] == "end"), RunDir(run).config().model
    scored = re.search(r"^final val (\d\.\d{4})", ran.text, re.M)
    sample = [line for line in ran.text.split("-character sample from", 1)[-1].splitlines()[1:]
              if not line.startswith(("note:", "warning:"))]  # its notes, on stderr, are read with it
    return [(what, f"{ran.wall:.0f} s in all: {model.n_layer} x {model.n_embd} (depth x width) trained "
                   f"{end['step']:,} steps in {end['elapsed']:.0f} s, final val {scored[1] if scored else '-'}; "
                   f"sample: {' '.join(sample)[:60]!r}", "done within the budget and a sample")]


# Each stage's parts, each measured in a process group of its own (`isolated`) for at most its seconds, named for the
# row that says it crashed or ran out of time. The caps: what each took on the H100 and H200 of
# docs/reference/performance.md, cut to fit SECONDS; the parts that run a command under their cap (the recipe, the
# demo, the CUDA tests) keep what it did before the cap.
SECONDS = 540  # a lent GPU's one command: 9 minutes
PARTS: dict[str, list[tuple[str, Part, float]]] = {
    "peak": [("peak FLOP/s (MFU's denominator)", peak, 15)],
    "decode": [(f"decoding, {name}, {'CUDA graphs' if graphs else 'eager'}", partial(decoding, name, graphs), 20)
               for name in DECODED for graphs in (False, True)],
    "shakespeare": [("Shakespeare-char recipe", shakespeare, 110)],
    "gpt2": [(f"GPT-2 small, micro-batch {size}, compiled", partial(gpt2, index), 45)
             for index, size in enumerate(FULL.batch_sizes)],
    "demo": [("make demo's commands", demo, 80)],
    "cuda": [("CUDA tests", cuda, 165)],
}
STAGES = tuple(PARTS)


# Each part's process is forked from a server process that never touched the GPU (a child forked from one that has
# cannot use CUDA), which imports torch and lmlab once (`main`), so that a part starts in a fraction of a second.
CHILDREN = multiprocessing.get_context("forkserver")


def isolated(what: str, part: Part, ctx: Context, seconds: float = math.inf) -> list[Row]:
    """`part(ctx)`'s rows, measured in a process of its own, so that a crash in native code (a kernel, a compiled
    library: AOTInductor's loader on CUDA with torch 2.11), an error or running past `seconds` costs that part's rows
    alone, said in a row named `what`, and the report goes on; what the part noted for the checklist joins `ctx`'s."""
    ours, theirs = CHILDREN.Pipe(duplex=False)
    process = CHILDREN.Process(target=_measure, args=(part, replace(ctx, seconds=seconds), theirs))
    started = time.perf_counter()
    process.start()
    theirs.close()  # so that a child that dies unsent ends `recv` rather than leaving it waiting
    if not ours.poll(None if seconds == math.inf else seconds):
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the part and what it started: a pytest, a training process
        except ProcessLookupError:  # still starting, not yet in a group of its own
            process.kill()
        process.join()
        return [(what, f"stopped at its {seconds:.0f} s cap", "")]
    try:
        rows, results, memory, error = ours.recv()
    except EOFError:  # the process died before it sent anything
        process.join()
        code = process.exitcode or 0
        killed = f"killed by {signal.Signals(-code).name}" if code < 0 else f"ended with status {code}"
        return [(what, f"crashed: its process was {killed} after {time.perf_counter() - started:.0f} s", "")]
    process.join()
    ctx.results.update(results)
    ctx.memory.update(memory)
    return [(what, f"failed ({error}) after {time.perf_counter() - started:.0f} s", "")] if error else rows


def _measure(part: Part, ctx: Context, conn: Connection) -> None:
    """A part in the process `isolated` started: its rows and notes, or the error it raised, sent back."""
    os.setsid()  # a group of its own, which a cap ends whole
    configure(ctx.device)
    try:
        conn.send((part(ctx), ctx.results, ctx.memory, None))
    except (Exception, SystemExit) as err:
        traceback.print_exc()
        conn.send(([], {}, {}, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"))


def checklist(ctx: Context) -> list[Row]:
    """The first hour's checklist, each item with what this GPU said."""
    results, memory, device, rows = ctx.results, ctx.memory, ctx.device, []
    for item, source in CHECKLIST.items():
        if source == "tolerance":
            gaps = [f"{name.removeprefix('tolerance ')}: {value}" for _, recorded in results.values()
                    for name, value in recorded.items() if name.startswith("tolerance ")]
            failed = [name for name, (outcome, _) in results.items() if outcome in ("failed", "error")]
            ran = any(outcome != "skipped" for outcome, _ in results.values())
            said = "; ".join(gaps) or ("not recorded (the CUDA tests' process ended before writing them)" if ran
                                       else "not measured (no CUDA test ran)")
            rows.append((item, said + (f"; failed: {', '.join(failed)}" if failed else ""), "each within its bound"))
        elif source == "memory":
            reserved = memory.get(f"micro-batch {GUIDE_BATCH}")
            fits = reserved is not None and reserved <= (1 - GPU_HEADROOM) * GUIDE_GPU_BYTES
            said = ("not measured (dry run: another batch)" if device.type != "cuda" or reserved is None else
                    f"{reserved / 1e9:.1f} GB reserved at micro-batch {GUIDE_BATCH}, compiled: "
                    f"{'fits' if fits else 'does not fit'} 90% of 24 GB")
            rows.append((item, said, "fits"))
        else:
            said = [f"{outcome} ({name})" for name, (outcome, _) in results.items() if source in on_paths(name)]
            rows.append((item, "; ".join(said) or f"not run (no test of {source} ran)", "passed"))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| what | result | target |", "|---|---|---|"]
    return "\n".join(lines + [f"| {what} | {result} | {target} |" for what, result, target in rows]) + "\n"


def report(rows: list[Row], first_hour: list[Row], done: list[str]) -> str:
    text = markdown(rows) + "\nThe first hour on a GPU (docs/reference/performance.md):\n\n" + markdown(first_hour)
    left = [name for name in STAGES if name not in done]
    return text if not left else text + f"\nNot (yet) measured: {', '.join(left)}.\n"


def plan(stages: list[str], seconds: float) -> str:
    """The parts `stages` run, each with its cap, and the caps in all against the report's `seconds`."""
    parts = [(what, cap) for name in stages for what, _, cap in PARTS[name]]
    lines = [f"{cap:5.0f} s  {what}" for what, cap in parts]
    total = sum(cap for _, cap in parts)
    return "\n".join([f"gpu report: {len(parts)} parts, each a process group stopped whole at its cap:", *lines,
                      f"{total:5.0f} s  in all, of the {seconds:.0f} s the report may take"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and a few steps, on the CPU")
    parser.add_argument("--out", type=Path, help="the Markdown file (default: runs/gpu-report-<time>.md)")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare-char"),
                        help="the Shakespeare-char dataset (prepared there when missing)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"which parts to measure, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--minutes", type=float, default=SECONDS / 60, help="the parts' time in all; each part stops "
                        f"at its own cap or at what is left (default: {SECONDS / 60:g}, one lent GPU's command)")
    args = parser.parse_args()
    try:
        if not args.dry_run and not torch.cuda.is_available():
            raise UserError(f"{no_gpu_reason()}; or pass --dry-run.")
        scale, device = (DRY, torch.device("cpu")) if args.dry_run else (FULL, resolve_device("cuda"))
    except UserError as err:
        print(f"gpu_report: {err}", file=sys.stderr)
        sys.exit(2)
    # What this process imported, imported once by the server the parts' processes are forked from
    CHILDREN.set_forkserver_preload(["torch", *sorted(name for name in sys.modules if name in (
        "cuda_tests", "nanogpt_side_by_side") or name.startswith("lmlab"))])
    out = args.out or Path("runs") / f"gpu-report-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = [name for name in STAGES if name in (args.stages or STAGES)]
    console.print(plan(chosen, 60 * args.minutes), markup=False, highlight=False)
    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    with tempfile.TemporaryDirectory() as scratch:
        ctx = Context(scale, device, data=Path(scratch) / "data" / "shakespeare-char" if args.dry_run else args.data,
                      runs=Path(scratch) if args.dry_run else Path("runs"))
        rows = environment(device)
        done: list[str] = []
        for number, name in enumerate(chosen, 1):
            console.print(f"[bold]gpu report: stage {number} of {len(chosen)}, {name}[/bold] "
                          f"({time.perf_counter() - started:.0f} s so far)")
            for what, part, cap in PARTS[name]:
                left = deadline - time.perf_counter()
                rows += isolated(what, part, ctx, min(cap, left)) if left >= 1 else [
                    (what, f"not run: the report's {args.minutes:g} minutes were spent", "")]
                # Written after each part: a report cut short (the lease's end) keeps what it measured.
                out.write_text(report(rows, checklist(ctx), done), encoding="utf-8")
            done.append(name)
    rows.append(("report wall time", f"{time.perf_counter() - started:.0f} s", f"under {args.minutes:g} min"))
    text = report(rows, checklist(ctx), done)
    out.write_text(text, encoding="utf-8")
    print(text)
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
