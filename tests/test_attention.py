"""The two attention paths (lmlab.model.attention) and the choice between them (lmlab.train.attention, by the
machine's rule): both train the same model, the math path keeps no more than its memory counts, `auto` takes it on a
CPU in bfloat16 at a short context where it fits, a set path (train.attention, finetune.attention) is taken as set,
and a resumed run or a continued fine-tune keeps the path it trained by, whatever the rule says then."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lmlab.core import machine
from lmlab.core.config import FinetuneConfig, ModelConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.core.machine import MATH_CONTEXT
from lmlab.model.attention import CUDA_ONLY, PATHS, attend, score_bytes
from lmlab.model.gpt import GPT
from lmlab.model.memory import training_need
from lmlab.model.recurrent import RecurrentLM
from lmlab.train import attention
from lmlab.train.attention import choose_attention
from lmlab.train.finetune import finetune
from lmlab.train.loop import Trainer
from lmlab.train.optim import OPTIMIZERS
from lmlab.train.preflight import train_job
from tests.helpers import (
    ALPACA_TINY,
    a_machine,
    chosen,
    cut_at_first_checkpoint,
    same_weights,
    stable_events,
    write_config,
)

CPU = torch.device("cpu")
STATE = OPTIMIZERS["adamw"].state_bytes


@pytest.mark.parametrize("extra", [{}, {"n_kv_head": 1, "pos_emb": "rope", "qk_norm": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_give_the_same_loss_and_gradients(extra, dtype):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=30, **extra)
    x, y = torch.randint(0, 30, (3, 24)), torch.randint(0, 30, (3, 24))
    results = {}
    for path in ("fused", "math"):  # cudnn's twin: the CUDA tests'
        torch.manual_seed(0)
        model = GPT(config)
        assert model.use_attention(path)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        results[path] = loss.item(), [p.grad.clone() for p in model.parameters()]
    (fused, fused_grads), (math, math_grads) = results["fused"], results["math"]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: about 3 significant digits
    assert abs(fused - math) < tolerance * abs(fused)
    for a, b in zip(fused_grads, math_grads):
        assert (a - b).abs().max() <= tolerance * max(1.0, a.abs().max().item()) * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_math_path_keeps_no_more_per_score_than_its_memory_counts(dtype, dropout):
    """What the backward keeps of the math path's T x T tensors, traced by autograd's own hooks, is what
    `score_bytes` counts: the memory check of a math-path step holds."""
    B, nh, T, hs = 2, 4, 40, 8
    q, k, v = (torch.randn(B, nh, T, hs, dtype=dtype, requires_grad=True) for _ in range(3))
    kept: dict[int, int] = {}  # by storage: a view saved beside its base keeps no more

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[-1] == T and t.numel() >= B * nh * T * T:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v, "math", dropout).sum().backward()
    assert sum(kept.values()) == B * nh * T * T * score_bytes(dtype, dropout > 0)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.slow
def test_a_math_path_steps_peak_is_its_kept_scores_and_one_layers_two_gradients(layers):
    """The memory a math-path step holds at its peak, read from the process's high-water mark in a process of its
    own, is what `math_need` counts (so a step it lets through fits): each layer's kept scores and two score-sized
    gradients of one layer, within half of one score tensor (the step's other allocations, its threads' buffers)."""
    done = subprocess.run([sys.executable, "-c", PEAK, str(layers)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = ModelConfig(n_layer=layers, n_head=4, n_embd=64, block_size=4096, vocab_size=20)
    counted = attention.math_need(config, STATE, torch.float32).each - training_need(config, STATE).each
    assert abs(float(done.stdout) - counted / (4 * 4096 ** 2 * 4)) < 0.5


PEAK = """
import resource, sys, torch
from lmlab.model.attention import attend
B, nh, T, hs, layers = 1, 4, 4096, 16, int(sys.argv[1])
qkv = [[torch.randn(B, nh, T, hs, requires_grad=True) for _ in range(3)] for _ in range(layers)]
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # resident now, not its high water
sum(attend(q, k, v, "math", 0.0).sum() for q, k, v in qkv).backward()
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(grown / (B * nh * T * T * 4))
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_takes_the_math_path_on_a_cpu_in_bfloat16_at_a_short_context(device, dtype):
    """The rule over devices, dtypes and contexts: math on a CPU in bfloat16 up to MATH_CONTEXT, where its scores fit;
    torch's fused kernel everywhere else (on CUDA, flash where it applies). Nothing is timed."""
    for block in (16, MATH_CONTEXT, MATH_CONTEXT + 1, 4 * MATH_CONTEXT):
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=20))
        machine = a_machine(device, dtype)
        path = choose_attention(model, TrainConfig(batch_size=4), machine, STATE)
        want = "math" if (device, dtype) == ("cpu", torch.bfloat16) and block <= MATH_CONTEXT else "fused"
        assert path == want and {b.attn.path for b in model.transformer.h} == {want}
        assert machine.made["attention"][0] == f"attention {want}" and machine.made["attention"][1].startswith("rule: ")


def test_auto_keeps_the_fused_kernel_where_the_scores_would_not_fit():
    """A batch whose scores outgrow this machine's memory (the fused step's need is far less): fused, said so; a
    batch that fits takes the math path."""
    config = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=MATH_CONTEXT, vocab_size=20)
    scores = (config.n_layer * score_bytes(torch.bfloat16, False) + 2 * 2) * config.n_head * MATH_CONTEXT ** 2
    batch = attention.host_memory() // scores + 1
    machine = a_machine("cpu", torch.bfloat16)
    assert choose_attention(GPT(config), TrainConfig(batch_size=batch), machine, STATE) == "fused"
    assert machine.made["attention"] == ("attention fused", "rule: the math path's scores would not fit in memory")
    assert choose_attention(GPT(config), TrainConfig(batch_size=1), machine, STATE) == "math"


def test_a_set_path_is_taken_as_set_and_a_model_without_attention_has_none_to_choose():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    for path in set(PATHS) - set(CUDA_ONLY):
        machine = a_machine()
        assert choose_attention(model, TrainConfig(attention=path), machine, STATE) == path
        assert machine.made["attention"] == (f"attention {path}", "train.attention")
    for path in CUDA_ONLY:
        with pytest.raises(UserError, match=f'train.attention = "{path}" is a kernel of CUDA\'s, and this run trains '
                                            "on cpu; set it to auto, fused or math"):
            choose_attention(model, TrainConfig(attention=path), a_machine(), STATE)
    recurrent = RecurrentLM(ModelConfig(kind="recurrent", n_layer=1, n_embd=16, block_size=16, vocab_size=20))
    assert choose_attention(recurrent, TrainConfig(), a_machine(), STATE) is None


def test_auto_takes_the_first_process_choice():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    path = choose_attention(model, TrainConfig(), a_machine("cpu", torch.bfloat16), STATE,
                            agree=lambda mine: PATHS.index("fused"))
    assert path == "fused" and model.transformer.h[0].attn.path == "fused"


@pytest.mark.slow
def test_a_resumed_run_trains_by_the_path_it_started_with(tmp_path, char_dataset, monkeypatch):
    """Started on the math path by the rule (bfloat16 at a short context), resumed from its first checkpoint where the
    rule says fused (its context past MATH_CONTEXT now): it goes on by the math path, its checkpoint says so, and it
    ends bitwise where the run never stopped ends."""
    quiet = Console(quiet=True)
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset),
                      ["train.attention=auto", "train.dtype=bfloat16", "train.max_iters=14",
                       "train.checkpoint_interval=7", "train.eval_interval=25"])
    straight = Trainer(train_job(cfg, tmp_path / "straight", "cpu", console=quiet)).run().run_dir
    assert chosen(straight, "attention")[0] == "attention math"
    run = cut_at_first_checkpoint(straight, tmp_path / "resumed")
    monkeypatch.setattr(machine, "MATH_CONTEXT", 0)
    console = Console(record=True, width=200)
    Trainer(train_job(load_config(run / "config.toml"), run, "cpu", resume=True, console=console)).run()
    assert "attention math (as this run trained, its checkpoint says)" in console.export_text()
    assert stable_events(run) == stable_events(straight)
    same_weights(straight, run)


def _tune(base: Path, out: Path, path: str = "auto") -> str:
    """Fine-tune `base` into `out` on one thread with finetune.attention = `path`; what it printed."""
    console = Console(record=True, width=200)
    ft = FinetuneConfig(str(ALPACA_TINY), epochs=1, batch_size=8, checkpoint_interval=3, threads=1, attention=path)
    finetune(base, out, ft, "cpu", console=console)
    return console.export_text()


@pytest.mark.slow
def test_a_fine_tune_set_to_a_path_takes_it_and_auto_takes_the_rules(tmp_path, imported_gpt2):
    """finetune.attention is to a fine-tune what train.attention is to a run: set, it decides; at `auto` the rule's
    path (fused, in float32), said and recorded."""
    assert "attention math (finetune.attention)" in " ".join(_tune(imported_gpt2, tmp_path / "set", "math").split())
    assert chosen(tmp_path / "set", "attention") == ("attention math", "finetune.attention")
    assert "attention fused (rule: " in " ".join(_tune(imported_gpt2, tmp_path / "auto").split())
    assert chosen(tmp_path / "auto", "attention")[0] == "attention fused"


@pytest.mark.slow
def test_a_continued_fine_tune_trains_by_the_path_it_started_with(tmp_path, imported_gpt2):
    """Started on the math path, continued from its first checkpoint with `auto` (the rule: fused): it goes on by
    the math path, its checkpoint says so, and it ends bitwise where the fine-tune never stopped ends."""
    _tune(imported_gpt2, tmp_path / "straight", "math")
    run = cut_at_first_checkpoint(tmp_path / "straight", tmp_path / "continued")
    said = " ".join(_tune(imported_gpt2, run).split())
    assert "Resumed" in said and "attention math (as this run trained, its checkpoint says)" in said
    assert stable_events(run) == stable_events(tmp_path / "straight")
    same_weights(tmp_path / "straight", run)
