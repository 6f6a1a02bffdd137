"""benchmarks/gpu_report.py --dry-run: the GPU report's every step, small, on the CPU, so it cannot rot between the
times a GPU is at hand."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["CUDA tests (tests/test_cuda.py)", "peak FLOP/s in", "GPT-2 small, micro-batch 1, compile on",
        "GPT-2 small, micro-batch 2, compile off", "GPT-2 small, largest micro-batch",
        "Shakespeare-char: time to val 1.50", "Shakespeare-char: time to val 1.47",
        "Shakespeare-char: final val", "sampling, demo-size model", "GPT-2 small checkpoint",
        "report wall time"]


@pytest.mark.slow
def test_the_dry_run_writes_every_row_of_the_report(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()[2:]}
    assert [r for r in ROWS if not any(what.startswith(r) for what in rows)] == []
    assert re.fullmatch(r"\d+ skipped in \d+ s", rows["CUDA tests (tests/test_cuda.py)"])  # no GPU here
    # MFU "-" where the peak was measured while the machine was busy: it would overstate it (lmlab.core.peak)
    micro = [v for k, v in rows.items() if k.startswith("GPT-2 small, micro")]
    assert micro and all(re.match(r"[\d,]+ tok/s, MFU ([\d.]+%|-)", v) for v in micro)
    biggest = int(rows["GPT-2 small, largest micro-batch that fits with headroom (eager)"])
    assert 1 <= biggest <= 4  # the dry run stops its search at 4
    assert re.match(r"\d\.\d{4} \(best, step 30\)", rows["Shakespeare-char: final val"])
    assert table in done.stdout  # printed as well as written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the report would run")
def test_without_a_gpu_the_full_report_says_what_to_do():
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr and "--dry-run" in done.stderr
