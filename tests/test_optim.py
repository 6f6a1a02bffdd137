"""Muon + AdamW as one optimizer through checkpoints and the NaN guard, and the warmup-stable-decay schedule."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lmlab.core.config import OPTIMIZER_NAMES, ModelConfig, TrainConfig, load_config
from lmlab.core.errors import UserError
from lmlab.model.memory import training_need
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.optim import OPTIMIZERS, Muon, MuonAdamW, optimizer_of, orthogonal_dtype
from lmlab.train.schedule import lr_at
from tests.helpers import write_config

# A constant LR after warmup, so a run stopped at step 8 and resumed to 16 follows the same schedule as one
# that ran to 16 straight.
MUON = ["train.optimizer=muon", "train.warmup_iters=0", "train.min_lr=3e-3", "model.dropout=0.1",
        "train.eval_interval=100", "train.checkpoint_interval=100"]


def trainer(tmp_path, dataset, overrides, run, **kw) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset), overrides)
    return Trainer(cfg, tmp_path / run, "cpu", **kw)


@pytest.mark.parametrize("kind", ["gpt", "recurrent"])
@pytest.mark.slow
def test_muon_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, char_dataset, kind):
    overrides = [*MUON, f"model.kind={kind}", "train.threads=1"]  # bitwise: the same threads in both runs
    straight = trainer(tmp_path, char_dataset, [*overrides, "train.max_iters=16"], "straight")
    assert isinstance(straight.step.optimizer, MuonAdamW)
    straight.run()
    trainer(tmp_path, char_dataset, [*overrides, "train.max_iters=8"], "resumed").run()
    run = tmp_path / "resumed"
    saved = load_file(str(RunDir(run).checkpoint("latest") / "optimizer.safetensors"))
    assert any(k.endswith("momentum_buffer") for k in saved) and any(k.endswith("exp_avg") for k in saved)
    cfg = load_config(run / "config.toml", ["train.max_iters=16"])
    Trainer(cfg, run, "cpu", resume=True).run()
    a = load_file(str(RunDir(tmp_path / "straight").checkpoint("latest") / "model.safetensors"))
    b = load_file(str(RunDir(run).checkpoint("latest") / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_muon_skips_a_non_finite_step_in_both_halves(tmp_path, char_dataset):
    t = trainer(tmp_path, char_dataset, [*MUON, "train.max_iters=10"], "run")
    clean_forward = t.step.forward

    def nan_forward(x, y):
        logits, loss = clean_forward(x, y)
        return logits, loss * float("nan") if t.progress.step == 4 else loss

    t.step.forward = nan_forward
    result = t.run()
    assert [(e["event"], e["step"]) for e in RunDir(result.run_dir).events() if e["event"] == "skip"] == [("skip", 5)]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert t.step.optimizer.adamw.state_dict()["state"][0]["step"].item() == 9  # 10 steps, one skipped


def _muon_moves(optimizer: type, **settings) -> list[torch.Tensor]:
    """How far four Muon steps on seeded random gradients move three matrices (wide, tall, square)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((24, 40), (48, 16), (32, 32))]
    before = [p.detach().clone() for p in params]
    opt = optimizer(params, lr=0.01, weight_decay=0.1, **settings)
    grads = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
        opt.step()
    return [p.detach() - b for p, b in zip(params, before)]


def test_muon_is_torchs_in_bfloat16_and_orthogonalises_in_float32_where_bfloat16_is_emulated(monkeypatch):
    torchs = _muon_moves(torch.optim.Muon, adjust_lr_fn="match_rms_adamw")
    assert all(torch.equal(a, b) for a, b in zip(torchs, _muon_moves(Muon, ns_dtype=torch.bfloat16)))
    for a, b in zip(torchs, _muon_moves(Muon, ns_dtype=torch.float32)):
        assert 0 < (a - b).abs().max() < 0.02 * a.abs().max()  # the same moves but for bf16's rounding
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2 CPU
    assert orthogonal_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AVX512-BF16 or AMX
    assert orthogonal_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert orthogonal_dtype(cuda) == torch.bfloat16  # Ampere on
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert orthogonal_dtype(cuda) == torch.float32  # Turing emulates bf16


def test_warmup_stable_decay_schedule():
    cfg = TrainConfig(schedule="wsd", max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1,
                      decay_fraction=0.2)
    lrs = [lr_at(step, cfg) for step in range(100)]
    assert lrs[0] < lrs[9] < 1.0  # warmup
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert lrs[80] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 20)))  # 1-sqrt decay over the last 20
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[99] == pytest.approx(0.1) and lr_at(150, cfg) == pytest.approx(0.1)


def test_every_optimizer_name_has_an_optimizer_whose_state_the_memory_check_counts():
    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)  # a name train.optimizer takes is one lmlab builds
    shape = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=43)
    adamw, muon = (training_need(shape, OPTIMIZERS[name].state_bytes).fixed for name in ("adamw", "muon"))
    assert muon < adamw  # Muon keeps one momentum for the hidden matrices, AdamW two moments for every weight
    with pytest.raises(UserError, match='optimizer = "muon" does not work with train.parallel = "fsdp"'):
        optimizer_of(TrainConfig(optimizer="muon", parallel="fsdp"))
    assert optimizer_of(TrainConfig(parallel="fsdp")) is OPTIMIZERS["adamw"]
