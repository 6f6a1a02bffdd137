"""Training in bf16 and compiled trains like the reference: bf16 autocast and torch.compile against fp32 eager, 50
steps; a model compiled block by block, by the modes a CPU and a GPU compile it in."""

import functools
import io
import os
import subprocess

import pytest
import torch
from rich.console import Console

from lmlab.core.config import ModelConfig
from lmlab.core.config_toml import load_config
from lmlab.core.device import CPU_COMPILE
from lmlab.model.gpt import GPT
from lmlab.run.rundir import RunDir
from lmlab.train.compiled import GRAPHS, CompiledBlocks
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import LMLAB, chosen, write_config

# Documented tolerances on the per-step training loss over the first 50 steps of a seeded run.
BF16_TOLERANCE = 1e-2  # bf16 keeps 8 bits of mantissa; measured max difference 5e-4 on this test
COMPILE_TOLERANCE = 1e-4  # the same math in fused kernels, only the summation order differs; measured 5e-7


def losses(tmp_path, char_dataset, name: str, settings: list[str]) -> list[float]:
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=50),
                      ["train.log_interval=1", "train.eval_interval=50", *settings])
    run = Trainer(train_job(cfg, tmp_path / name, "cpu")).run().run_dir
    return [e["loss"] for e in RunDir(run).events() if e["event"] == "train"]


@pytest.mark.slow
def test_bf16_and_compiled_losses_track_fp32_eager(tmp_path, char_dataset):
    reference = losses(tmp_path, char_dataset, "fp32", ["train.dtype=float32", "train.compile=false"])
    bf16 = losses(tmp_path, char_dataset, "bf16", ["train.dtype=bfloat16", "train.compile=false"])
    compiled = losses(tmp_path, char_dataset, "compiled", ["train.dtype=float32", "train.compile=true"])
    assert len(reference) == len(bf16) == len(compiled) == 50
    assert reference[-1] < reference[0] - 0.5  # it learned, so the comparison means something
    assert max(abs(a - b) for a, b in zip(reference, bf16)) < BF16_TOLERANCE
    assert max(abs(a - b) for a, b in zip(reference, compiled)) < COMPILE_TOLERANCE


@pytest.mark.slow
def test_compiling_on_a_cpu_says_what_it_costs_before_the_first_step(tmp_path, char_dataset):
    """A write-up's tip (`train.compile = true`) printed nothing for 131 s on a CPU, then trained no faster: the
    line comes before the first step waits for the compiler (the test stops the run there)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    proc = subprocess.Popen([LMLAB, "train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu", "--set",
                             "train.compile=true"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        said = []
        for line in proc.stdout:
            said.append(line)
            if "trains eager at once." in line or line.startswith("step "):
                break
    finally:
        proc.kill()
        proc.wait()
    assert CPU_COMPILE in " ".join("".join(said).split()), said  # the console wraps it at its width
    assert not any(line.startswith("step ") for line in said)


@pytest.mark.slow
def test_compiled_training_on_a_cpu_stays_compiled_as_asked_and_evaluates_eagerly(tmp_path, char_dataset):
    """train.compile = true on a CPU compiles, as asked, and stays so (no timing undoes it), said and recorded;
    evaluations run the eager model, never compiling the eval-mode graph too (a recompile would raise here)."""
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10),
                      ["train.compile=true", "train.eval_iters=2", "train.log_interval=1"])
    console = Console(file=io.StringIO(), width=300)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run = Trainer(train_job(cfg, tmp_path / "run", "cpu", console=console)).run().run_dir
    assert chosen(run, "compile") == ("compiled", "train.compile")
    assert "compiled (train.compile)" in console.file.getvalue()
    assert [e["step"] for e in RunDir(run).events() if e["event"] == "eval"] == [10]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_blocks_replay_by_their_mode_in_training_and_run_eager_when_told(device, monkeypatch):
    """A GPU's modes (the blocks take only the device's type, so their tensors stay on this CPU): the blocks share
    one graph per mode (each compile seen by a backend that notes the mode it is asked for); training steps by the
    mode the machine's rule gave them (CUDA graphs on a GPU here), evaluations never as CUDA graphs (their batches
    vary) and eager on a CPU."""
    modes = []

    def backend(graph, inputs, mode="default"):
        modes.append(mode)
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch.compiler.reset()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    x = torch.randint(0, 20, (2, 8))
    eager = model(x, x)[1]
    mode = GRAPHS if device == "cuda" else "default"
    blocks = CompiledBlocks(model, torch.device(device), mode)
    assert torch.equal(model(x, x)[1], eager) and modes == [mode]  # both blocks replay one graph
    with blocks.eager():
        model(x, x)
    assert modes == [mode]
    model.eval()
    with torch.no_grad():
        model(x, x)
    assert modes == ([GRAPHS, "default"] if device == "cuda" else ["default"])
