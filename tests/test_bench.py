"""`lmlab bench` and `lmlab plan` on the CPU: real timings of a tiny model, arithmetic checked exactly; the step's
profile (benchmarks/step_profile.py) run small."""

import re
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.core.device import datasheet_peak
from lmlab.core.peak import peak_flops
from lmlab.experiments.bench import find_max_batch, largest_fitting, with_vocab
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from tests.helpers import ROOT, a_machine, write_config


@pytest.mark.slow
def test_bench_times_each_batch_size_and_sizes_evaluation(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    assert main(["bench", str(config), "--batch-sizes", "2,8", "--steps", "3", "--eval", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    said = " ".join(out.split())  # the dtype and the peak MFU is against, said before the table
    assert said.startswith("dtype float32 (train.dtype) ")
    # float32 is native on every CPU: MFU against its peak measured quiet, none against one measured busy
    standing = re.search(r"MFU against ([\d.]+) TFLOP/s: 2048² float32 matmul measured quiet", said)
    assert standing or "no MFU: the peak here" in said, said
    flops = build_model(with_vocab(load_config(config)).model).flops_per_token()
    rows = re.findall(r"│\s+(\d+) │\s+([\d,]+) │\s+([\d.]+) │\s+([\d.]+%|-) │\s+([\d,]+) MiB │", out)
    assert [int(r[0]) for r in rows] == [2, 8]
    for batch, rate, ms, mfu, _ in rows:
        rate, ms = float(rate.replace(",", "")), float(ms)
        assert abs(rate - int(batch) * 32 / (ms / 1000)) / rate < 0.05  # tokens/s = batch x block / step time
        if not standing:
            assert mfu == "-"
            continue
        expected = 100 * rate * flops / (float(standing[1]) * 1e12)  # against the peak said (its 3 figures)
        assert float(mfu[:-1]) == pytest.approx(expected, rel=0.01, abs=0.06)
    assert re.search(r"eval_iters <= \d+ keeps evaluation under 5%", out)


@pytest.mark.slow
def test_bench_times_a_checkpoint_where_runs_go(capsys, tmp_path, char_dataset, monkeypatch):
    """Checkpoint write and load times were only in a benchmark script: `bench --checkpoint` says them, measured as
    training writes one and a resume loads it, in runs/ (where checkpoints go), leaving nothing there."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", str(config), "--steps", "1", "--checkpoint", "--device", "cpu"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert re.search(r"a checkpoint \(the model and its optimizer state, [\d.]+ [KM]iB\) is written in [\d.]+ s "
                     r"\(atomic, fsynced\) and loaded in [\d.]+ s \(checksums verified\) in runs/; every 10 steps "
                     r"\(train.checkpoint_interval\) that is ([\d.]+%|under 0.1%) of the training time", said), said
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.slow
def test_each_batch_size_counts_its_own_peak_memory(capsys, tmp_path, char_dataset):
    """The RSS high-water mark is the process's: without resetting it, a small batch timed after a large one would
    report the large one's peak, and --find-max-batch's bisection would find nothing fits below it."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    args = ["--set", "model.block_size=256", "--batch-sizes", "128,1", "--steps", "1", "--device", "cpu"]
    assert main(["bench", str(config), *args]) == 0
    memory = dict(re.findall(r"│\s+(\d+) │.*│\s+([\d,]+) MiB │", capsys.readouterr().out))
    assert int(memory["1"].replace(",", "")) < int(memory["128"].replace(",", "")) - 20


@pytest.mark.slow
def test_find_max_batch_prints_each_try_and_stops_at_its_time_limit(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    assert main(["bench", str(config), "--find-max-batch", "--search-seconds", "0.001", "--steps", "1",
                 "--device", "cpu"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "Finding the largest micro-batch that fits (for at most 0.001 s" in said
    assert re.search(r"micro-batch 1: fits, peak memory [\d.]+ MiB of [\d.,]+ GiB allowed", said)
    # The first try cannot be skipped; the second would end past the limit, so it is not begun, and the time said
    # is the search's own.
    stopped = re.search(r"largest micro-batch that fits: 1 \(the search stopped after ([\d.]+) s: a larger try could "
                        r"have ended past 0.001 s; --search-seconds gives it longer\)", said)
    assert stopped and "micro-batch 2:" not in said


@pytest.mark.slow
def test_find_max_batch_reports_a_batch_that_fits(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    # Seconds, not the limit (4096, a minute of CPU); how far they go depends on the machine's load, so the verdict
    # is on what the search said: each try as it came, doubling, and the largest that fit.
    assert main(["bench", str(config), "--find-max-batch", "--search-seconds", "5", "--steps", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    found = int(re.search(r"largest micro-batch that fits: (\d+)", out).group(1))
    tried = [int(b) for b in re.findall(r"micro-batch (\d+): fits", out)]
    assert tried == [2**i for i in range(len(tried))] and tried[-1] == found
    assert re.search(r"largest micro-batch that fits: \d+ \(the search (took|stopped after) [\d.]+ s", out)


# Seconds a try of a batch takes: a fixed part (the model built) and steps in proportion to the batch, or growing as
# fast as its square (a machine slowing as memory fills).
TRY_SECONDS = {
    "fixed and proportional": lambda b: 2.0 + 0.01 * b, "proportional": lambda b: 0.05 * b,
    "fixed and square": lambda b: 1.0 + 0.001 * b * b, "square": lambda b: 0.002 * b * b, "fixed": lambda b: 0.3,
}


def simulated_search(took, largest: int, seconds: float) -> tuple[int, bool, float, list[int]]:
    """`largest_fitting` on a fake clock, each try taking `took(batch)` seconds, the batches up to `largest` fitting
    and those past twice it refused without a try: (found, finished, the seconds it took, the batches asked)."""
    clock, asked = [0.0], []

    def fits(batch: int) -> bool | None:
        asked.append(batch)
        if batch > 2 * largest:
            return None  # estimated not to fit: not tried
        clock[0] += took(batch)
        return batch <= largest

    found, finished = largest_fitting(fits, 4096, seconds, clock=lambda: clock[0])
    return found, finished, clock[0], asked


@pytest.mark.parametrize("law", TRY_SECONDS)
def test_the_batch_search_ends_within_its_seconds_and_finds_the_largest_batch_when_it_finishes(law):
    """Whatever the seconds and the largest batch that fits, the search ends within its seconds (the first try,
    which nothing foresees, excepted), and the batch it returns fits: the largest that does when it finished."""
    took = TRY_SECONDS[law]
    for largest in (1, 3, 100, 700, 5000):
        for seconds in (0.1, 0.5, 2, 7, 30, 120, 1e6):
            found, finished, spent, asked = simulated_search(took, largest, seconds)
            assert spent <= max(seconds, took(1)), (law, largest, seconds, asked)
            assert 1 <= found <= largest and asked[0] == 1
            assert found == min(largest, 4096) or not finished, (law, largest, seconds, asked)
            assert finished or seconds < 1e6


def test_plan_arithmetic_for_gpt2_small(capsys):
    assert main(["plan", "configs/gpt2-small.toml", "--chinchilla", "--tokens-per-sec", "100000"]) == 0
    out = capsys.readouterr().out
    params = int(re.search(r"parameters\s+│ ([\d,]+) \(", out).group(1).replace(",", ""))
    assert 124_000_000 < params < 125_000_000
    assert f"{20 * params:,} (20 tokens per parameter" in out
    # The one FLOP definition: 6 × the weights that multiply each token (all but the position table, as the
    # head shares the token table) + attention's 12·L·C·T, per token.
    per_token = 6 * (params - 1024 * 768) + 12 * 12 * 768 * 1024
    assert f"{per_token * 20 * params:.3g} FLOPs ({per_token:.3g} per token)" in out
    assert f"{20 * params / 100_000 / 3600:.1f} h" in out


@pytest.mark.slow
def test_plan_for_a_run_says_where_it_stands(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "run"), "--device", "cpu", "--measure"]) == 0
    out = capsys.readouterr().out
    seen = RunDir(tmp_path / "run").events()[-1]["tokens"]
    assert re.search(r"tokens seen so far\s+│ ([\d,]+) ", out).group(1) == f"{seen:,}"
    text = " ".join(re.sub("[│┃]", " ", out).split())  # table cells wrapped, as a reader reads them
    assert "Timing training steps of micro-batch 8, as training runs them" in text
    assert re.search(r"measured here on cpu in float32, micro-batch 8, \d threads?, as training runs", text)
    # the config's micro-batch and accumulation, not a micro-batch of 2
    assert main(["plan", str(tmp_path / "run"), "--device", "cpu", "--measure", "--set", "train.grad_accum_steps=2",
                 "--set", "train.batch_size=4"]) == 0
    text = " ".join(re.sub("[│┃]", " ", capsys.readouterr().out).split())
    assert re.search(r"measured here on cpu in float32, micro-batch 4 x 2 accumulated, \d threads?, as training runs",
                     text)


@pytest.mark.slow
def test_mfu_is_logged_against_a_measured_cpu_peak(tmp_path, char_dataset, capsys):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    start, *events = RunDir(tmp_path / "run").events()
    # The figure the run read (this process's, kept per thread count): measured on every core, before the run chose
    # its threads; asked on another count, a busy machine's second measurement would differ.
    torch.set_num_threads(start["machine"]["cpu_cores"])
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert (start["peak_flops"], start["peak_source"], start["peak_quiet"]) == (peak.flops, peak.describe(), peak.quiet)
    train = [e for e in events if e["event"] == "train"]
    assert train and all(  # none against a peak measured busy
        abs(e["mfu"] - e["tokens_per_sec"] * start["flops_per_token"] / start["peak_flops"]) < 1e-3 if peak.quiet
        else e["mfu"] is None for e in train)
    said = " ".join(capsys.readouterr().out.split())
    assert (f"MFU against {peak.flops / 1e12:.3g} TFLOP/s: 2048² float32 matmul measured quiet at {peak.measured_at}"
            if peak.quiet else f"no MFU: the peak here, {peak.flops / 1e12:.3g} TFLOP/s, is a 2048² float32 matmul "
            "measured while the machine was busy") in said


@pytest.mark.parametrize("name, dtype, row, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, "H100", 989), ("NVIDIA H100 PCIe", torch.bfloat16, "H100 PCIe", 756),
    ("NVIDIA H200", torch.bfloat16, "H200", 989), ("NVIDIA H200 NVL", torch.bfloat16, "H200 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", torch.float32, "A100", 156), ("NVIDIA A100-PCIE-40GB", torch.bfloat16, "A100 PCIe", 312),
    ("NVIDIA L4", torch.bfloat16, "L4", 121), ("NVIDIA L40", torch.bfloat16, "L40", 181),
    ("NVIDIA L40S", torch.bfloat16, "L40S", 362), ("NVIDIA GeForce RTX 3090 Ti", torch.float16, "RTX 3090 Ti", 80),
    ("NVIDIA GeForce RTX 4070 Ti", torch.bfloat16, "RTX 4070 Ti", 80.2),
    ("NVIDIA RTX 6000 Ada Generation", torch.bfloat16, "RTX 6000 Ada", 364.2),
    ("Tesla V100-SXM2-16GB", torch.float16, "V100", 125), ("RTX 4090", torch.float16, "RTX 4090", 165),
])
def test_gpus_are_matched_to_their_own_datasheet_row_by_the_model_in_the_name(name, dtype, row, tflops):
    assert datasheet_peak(name, dtype) == (tflops * 1e12, f"datasheet {row}")


@pytest.mark.parametrize("name", ["Some Future GPU", "NVIDIA GeForce RTX 4070 Ti SUPER",
                                  "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "Quadro RTX 6000"])
def test_a_gpu_the_table_does_not_list_is_measured_not_matched_to_a_neighbour(name):
    assert datasheet_peak(name, torch.bfloat16) is None


def test_cpus_and_dtypes_without_tensor_cores_are_measured():
    assert datasheet_peak("Tesla T4", torch.bfloat16) is None  # no bf16 tensor cores
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert peak.source == "measured matmul" and peak.flops > 1e9


@pytest.mark.slow
def test_find_max_batch_tries_each_batch_eagerly_over_one_micro_batch(tmp_path, char_dataset):
    """A compiled try recompiles at every batch size (minutes on a GPU) and its time, mostly compiling, would foresee
    the next try wrongly; accumulation only adds time. So each try is one eager micro-batch, whatever the config."""
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset), ["train.compile=true",
                                                                            "train.grad_accum_steps=4"])
    tried = []
    graphs = counters["stats"]["unique_graphs"]
    biggest, finished = find_max_batch(cfg, a_machine(), limit=2, say=lambda row, fits, budget: tried.append(row))
    assert (biggest, finished) == (2, True) and [row.batch_size for row in tried] == [1, 2]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled
    for row in tried:  # tokens/s x seconds per step = the tokens of one micro-batch
        assert row.tokens_per_sec * row.ms_per_step / 1000 == pytest.approx(row.batch_size * 32)


# The demo's architecture and optimizer at the tiny size, attention by the math path: every scope the profile tells
# apart runs (rotary, q/k norms, SwiGLU, the attention's core, Muon's tail).
MODERN = ["model.bias=false", "model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_emb=rope", "model.qk_norm=true",
          "train.optimizer=muon", "train.attention=math"]
KIND_ROW = re.compile(r"^│ (?P<kind>[A-Za-z][\w ,]*?) +│ +(?P<ms>[\d,.]+) │ +(?P<share>[\d.]+)% │ "
                      r"+(?P<gflop>[\d,.]+|-) │ +(?P<flop_share>[\d.]+%|-) │ "
                      r"+(?P<rate>[\d,.]+|-) │ +(?P<mfu>[\d.]+%|-) │$", re.M)


@pytest.mark.slow
def test_the_step_profile_has_a_row_per_kind_whose_shares_make_the_step_and_lmlab_s_flops(tmp_path, char_dataset):
    """benchmarks/step_profile.py --dry-run on a tiny config, as a process: a row per kind, their ms and shares adding
    up to the step's, and the GFLOP column (matmuls by their shapes, attention by lmlab's count) adding up to
    flops_per_token x the step's tokens, with torch's norm in place of lmlab's (every other test trains lmlab's). A
    verdict on the table's structure and arithmetic, never on speed."""
    from benchmarks.step_profile import KINDS, WHERE

    config = write_config(tmp_path / "tiny.toml", char_dataset)
    done = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--config", str(config), "--size", "0",
                           "--dry-run", "--torch-norm", *(arg for setting in MODERN for arg in ("--set", setting))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kinds, places = done.stdout.split("by where they run")
    rows = {row["kind"]: row for row in KIND_ROW.finditer(kinds)}
    assert list(rows) == [*KINDS, "the step"], kinds
    step = rows.pop("the step")
    number = lambda cell: float(cell.replace(",", "").rstrip("%"))  # noqa: E731
    assert sum(number(row["share"]) for row in rows.values()) == pytest.approx(100, abs=0.5)
    assert sum(number(row["ms"]) for row in rows.values()) == pytest.approx(number(step["ms"]), rel=0.01, abs=0.05)
    assert number(rows["optimizer"]["ms"]) > 0 and "Muon's Newton-Schulz" in done.stdout  # its tail was found
    counted = [name for name, row in rows.items() if row["gflop"] != "-"]
    assert counted == ["matmuls", "attention"]
    model = build_model(with_vocab(load_config(config, MODERN)).model)
    tokens = 8 * 32  # the tiny config's batch x block
    assert number(rows["attention"]["gflop"]) == pytest.approx(model.attention_flops() * tokens / 1e9, rel=0.01)
    total = sum(number(rows[name]["gflop"]) for name in counted)
    assert total == pytest.approx(number(step["gflop"]), rel=0.01)
    assert total == pytest.approx(model.flops_per_token() * tokens / 1e9, rel=0.03)  # norms' weights: no matmul
    assert sum(number(rows[name]["flop_share"]) for name in counted) == pytest.approx(100, abs=0.2)
    assert [line.split("│")[1].strip() for line in places.splitlines() if line.startswith("│ ")] == list(WHERE)
    assert re.search(r"load while it ran: (other processes used \d+% of the \d+ cores?|other processes' CPU use "
                     r"unknown)", done.stdout)
