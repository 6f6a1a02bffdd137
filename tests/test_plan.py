"""`lmlab plan` estimates at once: a datasheet GPU (`--gpu`) or this device, times an MFU that is given, measured
by the user's own runs on that hardware, or assumed; `--measure` times it instead."""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
import torch

from lmlab.analysis.runs import summarize
from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.core.device import machine
from lmlab.core.peak import peak_flops
from lmlab.experiments.bench import with_vocab
from lmlab.experiments.gputime import gpu_step_time
from lmlab.experiments.plan import DEFAULT_MFU, assumed, shape_of
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import as_budgeted, cut_at_first_checkpoint, write_config

GPT2 = "configs/gpt2-small.toml"


def plan(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def rate(out: str) -> float:
    return float(re.search(r"throughput\s+│ ([\d,]+) tokens/s", out).group(1).replace(",", ""))


@pytest.mark.parametrize("name, row, tflops, dtype", [
    ("H100", "H100", 989, "bfloat16"), ("h100", "H100", 989, "bfloat16"), ("4090", "RTX 4090", 165, "bfloat16"),
    ("H100 PCIe", "H100 PCIe", 756, "bfloat16"), ("NVIDIA A100-SXM4-80GB", "A100", 312, "bfloat16"),
    ("T4", "T4", 65, "float16"),
])
@pytest.mark.slow
def test_a_gpu_is_estimated_from_its_datasheet_step_by_step(capsys, tmp_path, name, row, tflops, dtype):
    code, out, _ = plan(capsys, GPT2, "--chinchilla", "--gpu", name, "--runs", tmp_path)
    assert code == 0
    cfg = with_vocab(load_config(Path(GPT2)))
    step = gpu_step_time(cfg, row, dtype, compiled=True)  # train.compile = "auto": compiled on a GPU
    assert rate(out) == pytest.approx(524_288 / step.seconds, abs=1)  # a step's tokens in the time of its parts
    assert re.search(rf"hardware\s+│ {row}: {tflops} TFLOP/s {dtype} \(datasheet {row}\)", out)
    mfu = 100 * rate(out) * shape_of(cfg).flops_per_token() / (tflops * 1e12)
    assert f"{mfu:.1f}% ({assumed(row, dtype, compiled=True)})" in " ".join(out.split()).replace(" │ │ ", " ")


def test_the_mfu_can_be_given_or_comes_from_a_run_on_that_gpu(capsys, tmp_path):
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--mfu", "0.45", "--runs", tmp_path)
    assert code == 0 and "45.0% (--mfu)" in out
    per_token = shape_of(load_config(Path(GPT2))).flops_per_token()
    assert rate(out) == pytest.approx(0.45 * 989e12 / per_token, abs=1)
    # A run folder from an H100 machine (as lmlab writes one there): its median MFU is used for that GPU only.
    run = tmp_path / "gpt2-h100"
    run.mkdir()
    (run / "config.toml").write_text(Path(GPT2).read_text())
    start = {"event": "start", "step": 0, "device": "cuda", "dtype": "bfloat16", "model": "gpt 12L/768",
             "flops_per_token": per_token, "world_size": 8, "peak_flops": 8 * 989e12,
             "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "AMD EPYC"}}
    trains = [{"event": "train", "step": 10 * i, "tokens": 5242880 * i, "loss": 5.0, "mfu": mfu, "tokens_per_sec": 1}
              for i, mfu in enumerate([0.41, 0.47, 0.44], 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [start, *trains]))
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path)
    said = " ".join(out.split())
    assert code == 0 and f"44.0% (the median of {run}, of this config, of the 989 TFLOP/s it recorded)" in said
    assert rate(out) == pytest.approx(0.44 * 989e12 / per_token, abs=1)  # one GPU's share of the 8-GPU job's peak
    code, out, _ = plan(capsys, GPT2, "--gpu", "A100", "--runs", tmp_path)
    assert "(the GPU time model's: a compiled" in out  # no run on an A100


def h100_run(folder: Path, config: str, mfus: list[float], finished: bool, when: float) -> Path:
    """A run folder as lmlab writes one on an H100 (GPT-2 small's shape), its median MFU `mfus`'s, last written at
    `when`."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config)
    start = {"event": "start", "step": 0, "device": "cuda", "dtype": "bfloat16", "model": "gpt 12L/768",
             "flops_per_token": 1e9, "world_size": 1, "peak_flops": 989e12,
             "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "AMD EPYC"}}
    trains = [{"event": "train", "step": 10 * i, "tokens": 5242880 * i, "loss": 5.0, "mfu": mfu, "tokens_per_sec": 1}
              for i, mfu in enumerate(mfus, 1)]
    end = [{"event": "end", "step": 10 * len(mfus), "tokens": 5242880 * len(mfus), "elapsed": 60.0,
            "stopped_early": False, "stopped_by": None}] * finished
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [start, *trains, *end]))
    os.utime(folder / "metrics.jsonl", (when, when))
    return folder


def test_the_mfu_comes_from_a_finished_run_of_the_same_config_before_a_newer_short_one(capsys, tmp_path):
    """Plan takes its MFU from a finished run of the identical config, not from a newer 7-second run of the same model
    with another batch size."""
    config = Path(GPT2).read_text()
    same = h100_run(tmp_path / "same", config, [0.40, 0.42, 0.41, 0.43, 0.42], True, 1_000_000)
    h100_run(tmp_path / "short", config.replace("batch_size = ", "batch_size = 1"), [0.12], False, 2_000_000)
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path)
    assert code == 0 and f"42.0% (the median of {same}, of this config, of the 989 TFLOP/s" in " ".join(out.split())


def test_a_run_of_the_same_model_trained_otherwise_lends_no_mfu(capsys, tmp_path):
    """With no run of the config, plan takes no MFU from a run of the same model trained otherwise (another batch
    runs at another MFU): only a run of the same config is what the plan plans."""
    config = Path(GPT2).read_text()
    other = h100_run(tmp_path / "other", config.replace("batch_size = ", "batch_size = 1"), [0.12] * 5, True, 1)
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path)
    assert code == 0 and "(the GPU time model's: " in out and str(other) not in out
    same = h100_run(tmp_path / "same", config, [0.40, 0.42, 0.41], True, 2)
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path)
    assert code == 0 and f"(the median of {same}, of this config," in " ".join(out.split())


def test_an_unprepared_dataset_leaves_unique_tokens_unknown(capsys, tmp_path):
    code, out, _ = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path)
    text = " ".join(out.split())
    assert code == 0 and "unknown (the dataset is not prepared here)" in text
    assert "(20 per parameter): unique tokens unknown (at most the train split's), tokens seen" in text
    assert "100.0% of it" not in text


@pytest.mark.slow
def test_this_machine_is_estimated_from_its_peak_and_the_mfu_of_its_own_runs(capsys, tmp_path, char_dataset):
    """A config is planned at the MFU a run of it reached here (where its peak was measured quiet); a run is planned
    at its own logged pace, whatever the machine's load was: never at a peak's guess (a busy run's plan said 32,496
    tokens/s where it had logged 5,090 to 9,758)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    run = tmp_path / "runs" / "tiny"
    Trainer(train_job(load_config(config), run, "cpu")).run()
    code, out, _ = plan(capsys, run, "--device", "cpu", "--runs", tmp_path / "none")
    assert code == 0 and "(the median its steps logged; --measure times it here now)" in " ".join(out.split())
    assert rate(out) == pytest.approx(summarize(run).tokens_per_sec, abs=1)
    code, out, _ = plan(capsys, config, "--device", "cpu", "--runs", tmp_path / "runs")
    assert code == 0
    start, *events = RunDir(run).events()
    per_token = shape_of(load_config(config)).flops_per_token()
    peak = peak_flops(torch.device("cpu"), torch.float32)  # measured once per process, as plan did
    said = f"cpu: {machine()['cpu']}: {peak.flops / 1e12:,.4g} TFLOP/s float32 ({peak.brief()})"
    assert said in " ".join(out.split())
    if not start["peak_quiet"]:  # measured on a busy machine: its MFU may read high, and none is taken from the run
        assert f"{100 * DEFAULT_MFU:.1f}% (assumed" in out
        return
    mfu = statistics.median(e["mfu"] for e in events if e["event"] == "train")
    # the MFU is a share of the peak the run measured (a CPU's varies from process to process): what it reached
    assert rate(out) == pytest.approx(mfu * start["peak_flops"] / per_token, abs=1)
    assert (f"{100 * mfu:.1f}% (the median of {run}, of this config, of the {start['peak_flops'] / 1e12:.3g} TFLOP/s "
            "it recorded)") in " ".join(out.split())


def test_a_run_whose_peak_was_not_checked_for_load_lends_no_mfu(capsys, tmp_path, char_dataset):
    """A run whose start event records a peak not checked for the machine's load (or measured busy) logs MFUs that
    cannot be trusted; plan never reuses them."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(config.read_text())
    start = {"event": "start", "step": 0, "device": "cpu", "dtype": "float32", "model": "gpt 2L/32",
             "peak_flops": 0.0507e12, "peak_source": "measured matmul", "machine": machine()}
    trains = [{"event": "train", "step": 5 * i, "tokens": 1280 * i, "loss": 3.0, "mfu": 1.7, "tokens_per_sec": 1}
              for i in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [start, *trains]))
    code, out, _ = plan(capsys, config, "--device", "cpu", "--runs", tmp_path / "runs")
    assert code == 0 and f"{100 * DEFAULT_MFU:.1f}% (assumed" in out and "170.0%" not in out


@pytest.mark.slow
def test_a_gpu_plan_counts_the_evaluations_of_an_interval_in_passes_over_the_split(capsys, tmp_path, char_dataset):
    code, _, err = plan(capsys, GPT2, "--gpu", "H100", "--runs", tmp_path, "--set", "train.eval_interval=epoch")
    assert code == 2 and "train.eval_interval 'epoch' counts passes over the train split, which is not prepared" in err
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=1000)  # 256 tokens a step
    split = json.loads((char_dataset / "meta.json").read_text())["train"]["tokens"]
    steps = load_config(config, ["train.eval_interval=epoch"]).train.eval_steps(split, 256)
    walls = []
    for interval in ("epoch", str(steps)):  # a pass's evaluations, as many as those every pass's steps
        code, out, _ = plan(capsys, config, "--gpu", "H100", "--runs", tmp_path, "--set",
                            f"train.eval_interval={interval}")
        walls.append(re.search(r"wall time\s+│ ([^│]+)│", out).group(1).strip())
        assert code == 0 and "evaluating" in walls[-1]
    assert walls[0] == walls[1]


def test_the_plan_counts_passes_over_the_data_and_warns_past_four(capsys, tmp_path, char_dataset):
    split = json.loads((char_dataset / "meta.json").read_text())["train"]["tokens"]
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=1000)  # 256 tokens a step
    code, out, _ = plan(capsys, config, "--tokens-per-sec", "1000")
    text = " ".join(out.split())
    params = int(re.search(r"parameters\s+│ ([\d,]+) \(", out).group(1).replace(",", ""))
    assert code == 0 and f"{256_000 / split:.2f} over the {split:,}-token train split" in text
    unique, seen = 100 * split / (20 * params), 100 * 256_000 / (20 * params)
    assert f"unique tokens {split:,} are {unique:.1f}% of it, tokens seen {seen:.1f}%" in text
    assert f"this plan passes over its {split:,}-token train split {256_000 / split:.1f} times" in text
    assert "Muennighoff et al. 2023" in text
    code, out, _ = plan(capsys, config, "--tokens", str(2 * split), "--tokens-per-sec", "1000")
    assert code == 0 and "2.00 over the" in out and "Muennighoff" not in out


def test_six_n_d_is_shown_beside_lmlabs_compute_with_why_they_differ(capsys):
    assert main(["plan", GPT2, "--tokens", "1000000", "--tokens-per-sec", "1000"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    model = shape_of(load_config(Path(GPT2)))
    six_nd = 6 * model.num_params() * 1_000_000
    change = six_nd / (model.flops_per_token() * 1_000_000) - 1
    above = "above" if change >= 0 else "below"
    assert f"6·N·D │ {six_nd:.3g} FLOPs, {100 * abs(change):.1f}% {above} lmlab's (below)" in text
    assert (f"6·N·D and lmlab's compute: 6·N·D counts all {model.num_params():,} parameters (the "
            f"{model.lookup_params():,} of lookup-only tables among them) and no attention; lmlab counts 6 × the "
            f"{model.num_params() + model.padding_params() - model.lookup_params():,} weights that multiply each token "
            f"(with the {model.padding_params():,} of vocabulary padding rows) plus attention's "
            f"{model.attention_flops():,.0f} FLOPs per token (PaLM's formula): 6·N·D is {100 * abs(change):.1f}% "
            f"{above} it.") in text


def test_bad_gpu_names_and_mfu_values_are_refused_with_the_fix(capsys, tmp_path):
    code, _, err = plan(capsys, GPT2, "--gpu", "B200")
    assert code == 2 and "--gpu B200 is not in the datasheet table; use one of " in err and "RTX 4090" in err
    code, _, err = plan(capsys, GPT2, "--gpu", "RTX")
    assert code == 2 and "--gpu RTX could be " in err and "RTX 4090" in err and "RTX 3090" in err
    assert err.rstrip().endswith("; name one of them.")
    code, _, err = plan(capsys, GPT2, "--gpu", "H100", "--mfu", "40")
    assert code == 2 and "--mfu 40.0 must be a fraction in (0, 1]" in err
    code, _, err = plan(capsys, GPT2, "--measure", "--mfu", "0.4")
    assert code == 2 and "--mfu goes with the estimate" in err
    with pytest.raises(SystemExit):  # argparse: one way to get the throughput
        main(["plan", GPT2, "--gpu", "H100", "--measure"])


def test_a_budgeted_run_is_planned_by_its_budget_not_the_max_iters_it_ignored(capsys, tmp_path, trained):
    """`lmlab plan RUN` of a run a 70 s budget trained (its config.toml's max_iters 5,000): its tokens are what its
    budget planned, its wall time the budget, and a finished run has no time to finish; a killed one is measured
    against what its budget foresaw then. A run by steps is measured against its max_iters."""
    budgeted = as_budgeted(trained, tmp_path / "s004", 70.0, 16)
    killed = cut_at_first_checkpoint(budgeted, tmp_path / "killed")
    per_step = summarize(trained).tokens // summarize(trained).steps
    for run, steps, ending in ((budgeted, 20, "none: finished"), (killed, 16, None), (trained, 20, "none: finished")):
        code, out, _ = plan(capsys, run, "--device", "cpu")
        said = " ".join(re.sub("[│┃]", " ", out).split())
        how = "train.max_iters x tokens per step" if run == trained else \
            f"its 70 s budget's plan: {steps} steps x tokens per step"
        assert code == 0 and f"training tokens {steps * per_step:,} ({how};" in said
        assert ("wall time 70 s: its budget (" in said) == (run != trained)
        finish = re.search(r"time to finish (.*?) └", said).group(1)
        assert finish == ending if ending else re.fullmatch(r"[\d.]+ s", finish)  # the rest of its 16 steps
    assert main(["runs", str(tmp_path), "--json"]) == 0
    listed = {r["run"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert [(listed[name]["planned_steps"], listed[name]["budget_seconds"], listed[name]["first_plan"])
            for name in ("s004", "killed")] == [(20, 70.0, 16), (16, 70.0, 16)]
