"""`lmlab bench` and `lmlab plan` on the CPU: real timings of a tiny model, arithmetic checked exactly."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lmlab.commands import main
from lmlab.device import MEASUREMENTS, datasheet_peak, peak_cache_key, peak_cache_path, peak_flops
from lmlab.rundir import RunDir
from tests.conftest import write_config


def test_bench_times_each_batch_size_and_sizes_evaluation(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    assert main(["bench", str(config), "--batch-sizes", "2,8", "--steps", "3", "--eval", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"│\s+(\d+) │\s+([\d,]+) │\s+([\d.]+) │\s+([\d.]+)% │\s+([\d,]+) MiB │", out)
    assert [int(r[0]) for r in rows] == [2, 8]
    for batch, rate, ms, mfu, _ in rows:
        rate, ms = float(rate.replace(",", "")), float(ms)
        assert rate > 0 and 0 < float(mfu) < 100
        assert abs(rate - int(batch) * 32 / (ms / 1000)) / rate < 0.05  # tokens/s = batch x block / step time
    assert re.search(r"eval_iters <= \d+ keeps evaluation under 5%", out)


@pytest.mark.slow
def test_find_max_batch_reports_a_batch_that_fits(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    assert main(["bench", str(config), "--find-max-batch", "--steps", "1", "--device", "cpu"]) == 0
    found = int(re.search(r"largest micro-batch that fits: (\d+)", capsys.readouterr().out).group(1))
    assert found >= 8


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


def test_plan_for_a_run_says_where_it_stands(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "run"), "--device", "cpu", "--measure"]) == 0
    out = capsys.readouterr().out
    seen = RunDir(tmp_path / "run").events()[-1]["tokens"]
    assert re.search(r"tokens seen so far\s+│ ([\d,]+) ", out).group(1) == f"{seen:,}"
    assert "measured here" in out


def test_mfu_is_logged_against_a_measured_cpu_peak(tmp_path, char_dataset, capsys):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    start, *events = RunDir(tmp_path / "run").events()
    assert start["peak_source"] == "measured matmul" and start["peak_flops"] > 1e9
    train = [e for e in events if e["event"] == "train"]
    assert train and all(
        abs(e["mfu"] - e["tokens_per_sec"] * start["flops_per_token"] / start["peak_flops"]) < 1e-3 for e in train)


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
    value, source = peak_flops(torch.device("cpu"), torch.float32)
    assert source == "measured matmul" and value > 1e9


def test_a_measured_peak_is_kept_on_disk_as_the_best_of_the_first_measurements(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    keys = [peak_cache_key(cpu, dtype) for dtype in (torch.float32, torch.bfloat16)]
    cache = tmp_path / "lmlab" / "peak_flops.json"
    assert peak_cache_path() != cache  # the tests' own cache (conftest), not this one
    cache.parent.mkdir()
    cache.write_text(json.dumps({keys[0]: {"flops": 123e9, "measurements": MEASUREMENTS},  # settled: read back
                                 keys[1]: {"flops": 1e30, "measurements": MEASUREMENTS - 1}}))  # measured once more
    code = (f"import torch; torch.set_num_threads({threads}); from lmlab.device import peak_flops; "
            "print(*(peak_flops(torch.device('cpu'), t)[0] for t in (torch.float32, torch.bfloat16)))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert [float(v) for v in done.stdout.split()] == [123e9, 1e30]  # a new measurement never beats 1e30
    assert json.loads(cache.read_text())[keys[1]] == {"flops": 1e30, "measurements": MEASUREMENTS}
    cache.write_text("{not json")  # a damaged cache is measured over, never an error
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert all(1e9 < float(v) < 1e30 for v in done.stdout.split())
    assert json.loads(cache.read_text())[keys[0]]["measurements"] == 1
