"""The two attention paths (lmlab.model.attention) and the choice between them (lmlab.train.attention): both train
the same model, the math path keeps no more than its memory counts, `auto` takes it only where it is faster by the
gain and fits, a set path (train.attention, finetune.attention) is taken untimed, and a resumed run or a continued
fine-tune keeps the path it trained by."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lmlab.core.config import FinetuneConfig, ModelConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.model.attention import CUDA_ONLY, PATHS, attend, score_bytes
from lmlab.model.gpt import GPT
from lmlab.model.memory import training_need
from lmlab.model.recurrent import RecurrentLM
from lmlab.run.rundir import RunDir
from lmlab.train import attention
from lmlab.train.attention import GAIN, choose_attention
from lmlab.train.finetune import finetune
from lmlab.train.loop import Trainer
from lmlab.train.machine import Machine
from lmlab.train.optim import OPTIMIZERS
from tests.helpers import (
    ALPACA_TINY,
    cut_at_first_checkpoint,
    events_of,
    forget_choices,
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


def timer(fused_ms: float, math_ms: float):
    return lambda path: (fused_ms if path == "fused" else math_ms) / 1000


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.85, 0.9, 0.95, 1.0, 1.5, 4.0])
def test_auto_takes_the_math_path_only_where_it_is_faster_by_the_gain(ratio):
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    choice = choose_attention(model, TrainConfig(batch_size=4), Machine(CPU, torch.float32), STATE,
                              timer=timer(10.0, 10.0 * ratio))
    want = "math" if ratio <= GAIN else "fused"
    assert choice.path == want and {b.attn.path for b in model.transformer.h} == {want}
    assert choice.ms == pytest.approx({"fused": 10.0, "math": 10.0 * ratio})
    assert choice.record(0) == {"event": "attention", "step": 0, "path": want, "how": "measured", "fused_ms": 10.0,
                                "math_ms": round(10.0 * ratio, 3)}


def test_auto_keeps_the_fused_kernel_where_the_scores_would_not_fit():
    """A batch whose scores outgrow this machine's memory (the fused step's need is far less): fused, said so, the
    math path never timed; a batch that fits is timed."""
    config = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=1024, vocab_size=20)
    scores = (config.n_layer * score_bytes(torch.float32, False) + 2 * 4) * config.n_head * 1024 ** 2
    batch = attention.host_memory() // scores + 1
    timed: list[str] = []
    choice = choose_attention(GPT(config), TrainConfig(batch_size=batch), Machine(CPU, torch.float32), STATE,
                              timer=lambda path: timed.append(path) or 0.0)
    assert choice.path == "fused" and timed == [] and "with its scores, more than the" in choice.why
    choose_attention(GPT(config), TrainConfig(batch_size=1), Machine(CPU, torch.float32), STATE,
                     timer=lambda path: timed.append(path) or 0.0)
    assert set(timed) == set(PATHS) - set(CUDA_ONLY)


def test_a_set_path_is_taken_untimed_and_a_model_without_attention_has_none_to_choose():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    untimed = timer(float("nan"), float("nan"))
    for path in set(PATHS) - set(CUDA_ONLY):
        chosen = choose_attention(model, TrainConfig(attention=path), Machine(CPU, torch.float32), STATE, timer=untimed)
        assert chosen.path == path
    for path in CUDA_ONLY:
        with pytest.raises(UserError, match=f'train.attention = "{path}" is a kernel of CUDA\'s, and this run trains '
                                            "on cpu; set it to auto, fused or math"):
            choose_attention(model, TrainConfig(attention=path), Machine(CPU, torch.float32), STATE, timer=untimed)
    recurrent = RecurrentLM(ModelConfig(kind="recurrent", n_layer=1, n_embd=16, block_size=16, vocab_size=20))
    assert choose_attention(recurrent, TrainConfig(), Machine(CPU, torch.float32), STATE, timer=untimed) is None


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.95, 1.0, 2.0, None])
def test_auto_on_cuda_times_cudnn_against_torchs_pick_and_takes_it_only_where_faster_by_the_gain(fake_gpu, ratio):
    """On a faked GPU, the candidates are fused and cudnn (never math), timed in turns and recorded; cudnn is taken
    where it is faster by the gain, and a cuDNN that refuses the shape (None: it raises) leaves fused."""
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    timed: list[str] = []

    def faked(path: str) -> float:
        timed.append(path)
        if path == "cudnn" and ratio is None:
            raise RuntimeError("No available kernel. Aborting execution.")
        return (10.0 if path == "fused" else 10.0 * ratio) / 1000

    choice = choose_attention(model, TrainConfig(batch_size=4), Machine(torch.device("cuda"), torch.bfloat16), STATE,
                              timer=faked)
    want = "cudnn" if ratio is not None and ratio <= GAIN else "fused"
    assert set(timed) == ({"fused", "cudnn"}) and choice.path == want
    assert {b.attn.path for b in model.transformer.h} == {want}
    assert choice.record(0) == {"event": "attention", "step": 0, "path": want, "how": "measured", "fused_ms": 10.0,
                                **({} if ratio is None else {"cudnn_ms": round(10.0 * ratio, 3)})}
    assert ("cudnn refused" in choice.why) == (ratio is None)


def test_auto_takes_the_first_process_choice():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20))
    choice = choose_attention(model, TrainConfig(), Machine(CPU, torch.float32), STATE, timer=timer(10.0, 1.0),
                              agree=lambda mine: PATHS.index("fused"))
    assert choice.path == "fused" and model.transformer.h[0].attn.path == "fused"


@pytest.mark.slow
def test_a_resumed_run_trains_by_the_path_it_started_with(tmp_path, char_dataset, monkeypatch):
    """Started where the math path timed faster, resumed from its first checkpoint where fused does: it goes on by
    the math path, its checkpoint says so, and it ends bitwise where the run never stopped ends."""
    quiet = Console(quiet=True)
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset),
                      ["train.attention=auto", "train.max_iters=14", "train.checkpoint_interval=7",
                       "train.eval_interval=25"])
    monkeypatch.setattr(attention, "layer_timer", lambda *args: timer(10.0, 1.0))
    straight = Trainer(cfg, tmp_path / "straight", "cpu", console=quiet).run().run_dir
    assert [e["path"] for e in RunDir(straight).events() if e["event"] == "attention"] == ["math"]
    run = cut_at_first_checkpoint(straight, tmp_path / "resumed")
    monkeypatch.setattr(attention, "layer_timer", lambda *args: timer(1.0, 10.0))
    console = Console(record=True, width=80)
    Trainer(load_config(run / "config.toml"), run, "cpu", resume=True, console=console).run()
    assert "attention: math; as this run trained, its checkpoint says" in console.export_text()
    assert stable_events(run) == stable_events(straight)
    same_weights(straight, run)


def _tune(base: Path, out: Path, path: str = "auto") -> str:
    """Fine-tune `base` into `out` on one thread with finetune.attention = `path`; what it printed."""
    console = Console(record=True, width=80)
    ft = FinetuneConfig(str(ALPACA_TINY), epochs=1, batch_size=8, checkpoint_interval=3, threads=1, attention=path)
    finetune(base, out, ft, "cpu", console=console)
    return console.export_text()


@pytest.mark.slow
def test_a_fine_tune_set_to_a_path_takes_it_whatever_a_timing_says(tmp_path, imported_gpt2, monkeypatch):
    """finetune.attention is to a fine-tune what train.attention is to a run: set, it decides, untimed, so two
    fine-tunes on a load that tips the timing either way end bitwise equal; at `auto` the faster path is taken,
    said and recorded."""
    for fused_ms, math_ms in ((10.0, 1.0), (1.0, 10.0)):
        faked = timer(fused_ms, math_ms)
        monkeypatch.setattr(attention, "layer_timer", lambda *args, t=faked: t)
        forget_choices()  # a load that tips the timing the other way, not read back from the first fine-tunes
        assert "attention: fused; finetune.attention" in _tune(imported_gpt2, tmp_path / f"set{fused_ms}", "fused")
        assert [e["path"] for e in events_of(tmp_path / f"set{fused_ms}", "attention")] == ["fused"]
        faster = "math" if math_ms < fused_ms else "fused"
        assert f"attention: {faster}; auto: a layer's" in _tune(imported_gpt2, tmp_path / f"auto{fused_ms}")
        assert [e["path"] for e in events_of(tmp_path / f"auto{fused_ms}", "attention")] == [faster]
    same_weights(tmp_path / "set10.0", tmp_path / "set1.0")


@pytest.mark.slow
def test_a_continued_fine_tune_trains_by_the_path_it_started_with(tmp_path, imported_gpt2, monkeypatch):
    """Started where the math path timed faster, continued from its first checkpoint where fused does: it goes on
    by the math path, its checkpoint says so, and it ends bitwise where the fine-tune never stopped ends."""
    monkeypatch.setattr(attention, "layer_timer", lambda *args: timer(10.0, 1.0))
    _tune(imported_gpt2, tmp_path / "straight")
    run = cut_at_first_checkpoint(tmp_path / "straight", tmp_path / "continued")
    monkeypatch.setattr(attention, "layer_timer", lambda *args: timer(1.0, 10.0))
    said = _tune(imported_gpt2, run)
    assert "Resumed" in said and "attention: math; as this run trained, its checkpoint says" in said
    assert stable_events(run) == stable_events(tmp_path / "straight")
    same_weights(tmp_path / "straight", run)
