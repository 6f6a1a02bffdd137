"""The peak MFU divides by, robust to load: measured once on this machine and read back from then on, but measured
again while the kept one was measured busy (the faster busy one standing: load only slows a matmul), and no MFU
stands on one measured busy; the machine cache keys it by the processor and measures again over what it
cannot trust; `train.dtype = "auto"` on a CPU picks bf16 or fp32 by the same measurements."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmlab.core import busy, cache, peak
from lmlab.core.busy import Load, LoadMeter
from lmlab.core.device import processor
from lmlab.core.peak import (
    BF16_MARGIN,
    Peak,
    choose_dtype,
    matmul_size,
    measure_into_cache,
    native_kernel,
    peak_flops,
    peak_key,
    quiet,
)
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, fake_cpu, hog, run_cli, trusted, write_config

CPU = torch.device("cpu")
QUIET, BUSY = Load(0.75, 2, 0.01, 0.3), Load(0.75, 2, 0.6, 4.2)


def quiet_entry(flops: float) -> dict:
    """The cache entry a quiet measurement of `flops` leaves."""
    return {"flops": flops, "quiet": True, "measured_at": "2026-11-22 18:39:39", "load": QUIET.record()}


def write_cache(folder: Path, entries: dict[torch.dtype, dict], monkeypatch) -> None:
    """Keep `entries` (by dtype) in the machine cache under `folder`, as this process's CPU keys them."""
    with monkeypatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(folder))
        for dtype, entry in entries.items():
            cache.keep("peak", peak_key(CPU, dtype), entry)


def peak_in_subprocess(folder: Path, dtype: str = "float32") -> dict:
    """peak_flops in a fresh process (as a command measures it) with `folder` as XDG_CACHE_HOME."""
    code = ("import json, torch; from lmlab.core import cache; from lmlab.core.peak import peak_flops; "
            f"p = peak_flops(torch.device('cpu'), torch.{dtype}); "
            "print(json.dumps({'flops': p.flops, 'quiet': p.quiet, 'mfu': p.mfu(1e9), 'notes': cache.take_notes(), "
            "'describe': p.describe(), 'standing': p.standing()}))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XDG_CACHE_HOME": str(folder)},
                          capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def recalled(folder: Path, dtype: torch.dtype, monkeypatch) -> dict:
    with monkeypatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(folder))
        return cache.recall("peak", peak_key(CPU, dtype), trusted)


@pytest.mark.parametrize("others", [0.0, 1.0])
def test_a_peak_is_measured_once_and_read_back_unless_it_was_measured_busy(tmp_path, monkeypatch, others):
    """One measurement a machine and dtype, kept: a quiet one is read back by every later start, a busy one is
    measured again by the next, the faster busy figure standing until a quiet one replaces it (the cores' counters
    faked: `others` of them used besides this process)."""
    fake_cpu(monkeypatch, "avx2")  # bf16 without a native kernel: measured on a 256² matmul
    monkeypatch.setattr(peak, "SECONDS", 0.04)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reads = iter(range(0, 10**9, round(others * 10**6)) if others else [0] * 100)
    read = []
    monkeypatch.setattr(busy, "_busy_seconds", lambda cpus: read.append(1) or next(reads))
    found = measure_into_cache(CPU, torch.bfloat16)
    assert (len(read), found.quiet) == (2, not others)  # one measurement, its load read before and after
    assert cache.recall("peak", peak_key(CPU, torch.bfloat16), trusted)["flops"] == found.flops
    monkeypatch.setattr(peak, "_memo", {})  # a later start
    assert peak_flops(CPU, torch.bfloat16).quiet == (not others) and len(read) == (4 if others else 2)
    faster = 10 * found.flops
    cache.keep("peak", peak_key(CPU, torch.bfloat16), {**quiet_entry(faster), "quiet": False})  # busy, and faster
    monkeypatch.setattr(peak, "_memo", {})
    again = peak_flops(CPU, torch.bfloat16)
    assert (again.flops == faster, again.quiet) == (bool(others), not others)
    assert cache.recall("peak", peak_key(CPU, torch.bfloat16), trusted)["flops"] == again.flops


def test_the_peak_is_keyed_by_the_processor_and_a_figure_no_matmul_could_reach_is_measured_again(tmp_path,
                                                                                                 monkeypatch):
    key, who = peak_key(CPU, torch.float32), processor()
    assert key["processor"] == who and key["dtype"] == "float32" and key["matmul"] == 2048
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "_memo", {})
    foreign = {**key, "processor": {"name": "Intel(R) Xeon(R) Processor", "vendor_id": "GenuineIntel"}}
    cache.keep("peak", foreign, quiet_entry(1e30))  # copied from another machine: never read for this one
    cache.keep("peak", peak_key(CPU, torch.bfloat16), quiet_entry(-2e11))  # no matmul runs at a negative rate
    monkeypatch.setattr(peak, "SECONDS", 0.04)
    assert peak_flops(CPU, torch.float32).flops < 1e30 and peak_flops(CPU, torch.bfloat16).flops > 0
    assert cache.recall("peak", foreign, trusted)["flops"] == 1e30  # another processor's figure, untouched


@pytest.mark.slow
def test_a_command_measures_again_over_an_edited_cache_and_keeps_the_rest(tmp_path, monkeypatch):
    write_cache(tmp_path, {torch.float32: quiet_entry(2e11), torch.bfloat16: quiet_entry(3e11)}, monkeypatch)
    path = tmp_path / "lmlab" / "machine.json"
    path.write_text(path.read_text().replace("200000000000.0", "1e+30", 1))  # a figure made up by hand
    found = peak_in_subprocess(tmp_path)
    assert found["flops"] < 1e30  # measured here, 1e30 not read
    assert len(found["notes"]) == 1 and "do not match its checksum (edited by hand, or damaged)" in found["notes"][0]
    assert recalled(tmp_path, torch.bfloat16, monkeypatch)["flops"] == 3e11  # the other dtype's figure, untouched
    assert recalled(tmp_path, torch.float32, monkeypatch)["flops"] == found["flops"]


@pytest.mark.slow
def test_a_quiet_peak_is_read_back_without_measuring(tmp_path, monkeypatch):
    entry = quiet_entry(2.5e11)
    write_cache(tmp_path, {torch.float32: entry}, monkeypatch)
    found = peak_in_subprocess(tmp_path)
    assert (found["flops"], found["quiet"], found["mfu"], found["notes"]) == (2.5e11, True, 1e9 / 2.5e11, [])
    assert found["describe"] == f"2048² float32 matmul measured quiet at {entry['measured_at']}"


@pytest.mark.host_cpu  # the command it starts measures on the host's own kernels
@pytest.mark.slow
def test_a_dtype_the_cpu_has_no_native_kernel_for_is_measured_on_a_small_matmul_that_says_its_size(tmp_path):
    """fp16 on a CPU without AVX512-FP16/AMX-FP16 runs torch's scalar fallback, where a 2048² matmul takes 7-60 s
    and an fp16 run would stall for minutes before its first step: its peak is measured on a 256² matmul, keyed
    and named so."""
    side = 2048 if torch.ops.mkldnn._is_mkldnn_fp16_supported() else 256
    assert matmul_size(CPU, torch.float16) == side and matmul_size(CPU, torch.float32) == 2048
    assert peak_key(CPU, torch.float16)["matmul"] == side
    found = peak_in_subprocess(tmp_path, "float16")
    assert found["flops"] > 0 and found["describe"].startswith(f"{side}² float16 matmul measured")


@pytest.mark.slow
def test_a_peak_measured_busy_gives_no_mfu_anywhere_and_a_quiet_start_measures_it_again(tmp_path, char_dataset,
                                                                                     monkeypatch, capsys):
    """Against a peak measured while others used the cores MFU read 2-3x high (`MFU 50.8%` for steps at 20% of the
    quiet peak): such a run says it has none and why, and no train line, metrics.jsonl field or report cell shows one,
    nor one an older lmlab logged against a busy peak; a later quiet start measures the peak again and MFU stands on
    it. The cores' counters are faked: busy (others took every core) for the first run, quiet for the second."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(peak, "SECONDS", 0.04)
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    said = {}
    for name, reads in (("busy", itertools.count(0, 10**6)), ("quiet", itertools.repeat(0))):
        monkeypatch.setattr(peak, "_memo", {})  # another command
        monkeypatch.setattr(busy, "_busy_seconds", lambda cpus, reads=reads: next(reads))
        code, out, err = run_cli(capsys, "train", config, "--run", tmp_path / name, "--device", "cpu")
        assert code == 0, err
        said[name] = " ".join(out.split())
        start, *events = RunDir(tmp_path / name).events()
        assert start["peak_quiet"] is (name == "quiet") and recalled(tmp_path / "cache", torch.float32,
                                                                      monkeypatch)["quiet"] is (name == "quiet")
        assert any(e.get("mfu") for e in events if e["event"] == "train") is (name == "quiet")
    assert re.search(r"no MFU: the peak here, [\d.e+-]+ TFLOP/s, is a 2048² float32 matmul measured while the machine "
                     r"was busy \(other processes used 100% of the \d+ cores?[^)]*\) at [\d: -]+, and MFU against it "
                     r"would read high; a start on a quiet machine measures it again", said["busy"])
    assert "| MFU" not in said["busy"] and "| MFU" in said["quiet"] and "float32 matmul measured quiet" in said["quiet"]
    # an older lmlab logged MFU against a busy peak: readers leave it out
    metrics = tmp_path / "busy" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({**e, "mfu": 0.6} if e["event"] == "train" else e) + "\n"
                               for e in RunDir(tmp_path / "busy").events()))
    code, _, err = run_cli(capsys, "report", tmp_path / "busy", tmp_path / "quiet", "--out", tmp_path / "report",
                           "--no-eval", "--device", "cpu")
    assert code == 0, err
    report = " ".join((tmp_path / "report" / "report.md").read_text().split())
    assert re.search(r"\| MFU \(median\) \| - \| [\d.]+% \|", report), report
    assert "measured busy, so no MFU stands on it" in report


@pytest.mark.parametrize("cpu, bf16, fp32, chosen", [("amx-bf16", 0.12e12, 0.21e12, "float32"),  # the Intel hosts
                                                     ("avx512-bf16", 1.8e12, 0.28e12, "bfloat16"),  # the AMD EPYC
                                                     ("avx2", 1.8e12, 0.28e12, "float32")])  # no bf16: not measured
def test_auto_trains_in_the_dtype_that_measured_faster_and_says_why(tmp_path, char_dataset, monkeypatch, capsys, cpu,
                                                                    bf16, fp32, chosen):
    """On every host, each CPU kind faked: its capability check and its peak cache."""
    fake_cpu(monkeypatch, cpu)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "_memo", {})  # this process's peaks are read from the faked cache
    write_cache(tmp_path, {torch.bfloat16: quiet_entry(bf16), torch.float32: quiet_entry(fp32)}, monkeypatch)
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=2)
    code, out, err = run_cli(capsys, "train", config, "--run", tmp_path / "run", "--device", "cpu", "--set",
                             "train.dtype=auto")
    assert code == 0, out + err
    said = [" ".join(line.split()) for line in out.splitlines() if line.startswith("dtype ")]
    why = (f"auto: a 2048² matmul runs {bf16 / 1e12:.2f} TFLOP/s in bfloat16, {fp32 / 1e12:.2f} in float32 on this "
           f"CPU, {bf16 / fp32:.2f}x" if cpu != "avx2" else "auto: float32 (cpu without native bf16)")
    assert len(said) == 1 and said[0].startswith(f"dtype {chosen} ({why}"), out
    start = RunDir(tmp_path / "run").events()[0]
    assert start["dtype"] == chosen and start["dtype_reason"] == said[0].removeprefix(f"dtype {chosen} (")[:-1]
    assert start["peak_flops"] == (bf16 if chosen == "bfloat16" else fp32) and start["peak_quiet"] is True


@pytest.mark.slow
def test_the_commands_a_test_starts_answer_as_the_cpu_kind_it_fakes(tmp_path, char_dataset, monkeypatch):
    """`fake_cpu` reproduces another kind of host's choices on this one in the commands a test starts too
    (tests/cpu_kind), as the suite's own kind reaches them."""
    fake_cpu(monkeypatch, "avx512-bf16")
    write_cache(tmp_path, {torch.bfloat16: quiet_entry(1.8e12), torch.float32: quiet_entry(0.28e12)}, monkeypatch)
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=2)
    done = subprocess.run([LMLAB, "train", config, "--run", tmp_path / "run", "--device", "cpu", "--set",
                           "train.dtype=auto"], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "dtype bfloat16 (auto: a 2048² matmul runs 1.80 TFLOP/s in bfloat16" in " ".join(
        done.stdout.split()), done.stdout + done.stderr
    fake_cpu(monkeypatch, "avx2")
    done = subprocess.run([LMLAB, "train", config, "--run", tmp_path / "other", "--device", "cpu", "--set",
                           "train.dtype=auto"], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "dtype float32 (auto: float32 (cpu without native bf16))" in " ".join(
        done.stdout.split()), done.stdout + done.stderr


@pytest.mark.host_cpu
def test_auto_on_this_cpu_goes_by_a_real_measurement():
    """The session's real, cached measurements (conftest) decide here, at BF16_MARGIN."""
    dtype, why = choose_dtype(CPU, "auto")
    assert choose_dtype(CPU, "float32") == (torch.float32, "train.dtype")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert (dtype, why) == (torch.float32, "auto: float32 (cpu without native bf16)")
        return
    bf16, fp32 = peak_flops(CPU, torch.bfloat16), peak_flops(CPU, torch.float32)
    assert (dtype == torch.bfloat16) == (bf16.flops / fp32.flops >= BF16_MARGIN)
    assert f"runs {bf16.flops / 1e12:.2f} TFLOP/s in bfloat16, {fp32.flops / 1e12:.2f} in float32" in why


@pytest.mark.parametrize("own, work, others", [(0.9, 0.9, 0.0),  # this process alone, spinning: not counted
                                                (0.9, 2.2, 0.65),  # others took 1.3 of the 2 cores' 2 s
                                                (0.0, 5.0, 1.0)])  # more than every core: at most all of them
def test_a_load_meter_counts_other_processes_not_this_one_on_a_faked_clock(monkeypatch, own, work, others):
    """The meter's arithmetic on faked counters: the cores' work in the window, less this process's own CPU time,
    over the window's core-seconds, whatever else the host runs meanwhile."""
    clock, busy_seconds, cpu = iter([100.0, 101.0, 101.0]), iter([50.0, 50.0 + work]), iter([3.0, 3.0 + own])
    monkeypatch.setattr(busy, "cores", lambda: [0, 1])
    monkeypatch.setattr(busy, "_busy_seconds", lambda cpus: next(busy_seconds))
    monkeypatch.setattr(busy, "_own_cpu_seconds", lambda: next(cpu))
    monkeypatch.setattr(busy, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    with LoadMeter() as meter:
        pass
    assert meter.load.seconds == 1.0 and meter.load.cores == 2
    assert meter.load.others == pytest.approx(others) and meter.load.busy == (others > busy.BUSY_SHARE)


@pytest.mark.serial
@pytest.mark.slow
def test_a_load_meter_counts_other_processes_not_this_one():
    with LoadMeter() as meter:  # this process alone, spinning one thread
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:
            pass
    own = meter.load
    if own.others is None:
        pytest.skip("no /proc/stat here: the load average stands in")
    assert own.seconds >= 0.5 and own.loadavg is not None
    assert own.others < 0.5 / own.cores  # the spinning thread is this process's own: not counted
    with hog(1), LoadMeter() as meter:
        time.sleep(1.0)
    assert meter.load.others >= 0.8 / meter.load.cores and meter.load.busy
    assert "other processes used" in meter.load.describe()


@pytest.mark.slow
def test_a_peak_below_what_training_computes_is_called_wrong_and_gives_no_mfu(tmp_path, char_dataset, monkeypatch):
    """MFU is never printed above 100%: a peak that a tiny model's training outruns (a cache figure of 100 MFLOP/s,
    the least a kept peak may be) is wrong, and the run says so and logs no MFU from it."""
    with monkeypatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the key and entry of the one-thread process below
        write_cache(tmp_path, {torch.float32: quiet_entry(peak.LEAST_FLOPS)}, monkeypatch)
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    done = subprocess.run([LMLAB, "train", config, "--run", tmp_path / "run", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path),
                                                       "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert "MFU against 0.0001 TFLOP/s: 2048² float32 matmul measured quiet" in said
    assert re.search(r"warning: [\d.e+-]+ TFLOP/s were computed, more than the peak of 0.0001 \(2048² float32 matmul "
                     r"measured quiet at .*\), so that peak is wrong: no MFU from it", said)
    assert "| MFU" not in said  # on no train line
    assert all(e["mfu"] is None for e in RunDir(tmp_path / "run").events() if e["event"] == "train")


def test_a_dtype_without_a_native_kernel_gives_no_mfu():
    emulated = Peak(0.0028e12, "float16", "measured matmul", matmul=256, measured_at="2025-11-22 17:40",
                    native=False)
    assert emulated.mfu(0.005e12) is None and emulated.wrong(0.005e12) is None  # 191%: its peak is no hardware's
    assert emulated.standing().startswith("no MFU: float16 has no native kernel here, so its peak (a 256² float16 "
                                          "matmul measured quiet")
    assert Peak(1e12, "float32", "measured matmul").mfu(1.01e12) is None  # never above 100%
    busy_peak = Peak(1e12, "float32", "measured matmul", quiet=False)
    assert busy_peak.mfu(0.5e12) is None and busy_peak.wrong(2e12) is None  # nor against a busy peak
    assert native_kernel(CPU, torch.float32)


def test_a_gpus_peak_is_measured_quiet_whatever_the_cpus_load_and_in_tf32(fake_gpu):
    fake_gpu(name="NVIDIA GeForce RTX 5090", capability=(12, 0))  # not in the datasheet table: measured
    cuda = torch.device("cuda")
    assert quiet(BUSY, cuda) and not quiet(BUSY, CPU)  # a torchrun job's barriers spin every core meanwhile
    assert peak_key(cuda, torch.float32)["tf32"]  # a figure measured without TF32 is not read
    assert not peak_key(cuda, torch.bfloat16)["tf32"] and not peak_key(CPU, torch.float32)["tf32"]
    fake_gpu(name="NVIDIA H100 80GB HBM3", capability=(9, 0))
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert peak_flops(cuda, torch.float32).source == "datasheet H100"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # set before any fp32 peak is had
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
