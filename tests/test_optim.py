"""The contract of every optimizer in OPTIMIZERS (build, step, skip a non-finite step, resume bitwise, memory); Muon +
AdamW as one optimizer through checkpoints and the NaN guard; the warmup-stable-decay schedule."""

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmlab.commands.reference import config_page
from lmlab.core.config import OPTIMIZER_NAMES, ModelConfig, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.model import build_model
from lmlab.model.memory import training_need
from lmlab.run.checkpoint import load_checkpoint, model_tensors, save_checkpoint
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.optim import OPTIMIZERS, Muon, MuonAdamW, optimizer_of, orthogonal_dtype
from lmlab.train.preflight import train_job
from lmlab.train.schedule import lr_at
from lmlab.train.step import TrainStep
from tests.helpers import a_machine, fake_cpu, write_config

# A constant LR after warmup, so a run stopped at step 8 and resumed to 16 follows the same schedule as one
# that ran to 16 straight.
MUON = ["train.optimizer=muon", "train.warmup_iters=0", "train.min_lr=3e-3", "model.dropout=0.1",
        "train.eval_interval=100", "train.checkpoint_interval=100"]


def trainer(tmp_path, dataset, overrides, run, **kw) -> Trainer:
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset), overrides)
    return Trainer(train_job(cfg, tmp_path / run, "cpu", **kw))


@pytest.mark.parametrize("kind", ["gpt", "recurrent"])
@pytest.mark.slow
def test_muon_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, char_dataset, kind):
    overrides = [*MUON, f"model.kind={kind}", "train.threads=1"]  # bitwise: the same threads in both runs
    straight = trainer(tmp_path, char_dataset, [*overrides, "train.max_iters=16"], "straight")
    assert isinstance(straight.job.step.optimizer, MuonAdamW)
    straight.run()
    trainer(tmp_path, char_dataset, [*overrides, "train.max_iters=8"], "resumed").run()
    run = tmp_path / "resumed"
    saved = load_file(str(RunDir(run).checkpoint("latest") / "optimizer.safetensors"))
    assert any(k.endswith("momentum_buffer") for k in saved) and any(k.endswith("exp_avg") for k in saved)
    cfg = load_config(run / "config.toml", ["train.max_iters=16"])
    Trainer(train_job(cfg, run, "cpu", resume=True)).run()
    a = load_file(str(RunDir(tmp_path / "straight").checkpoint("latest") / "model.safetensors"))
    b = load_file(str(RunDir(run).checkpoint("latest") / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_muon_skips_a_non_finite_step_in_both_halves(tmp_path, char_dataset):
    t = trainer(tmp_path, char_dataset, [*MUON, "train.max_iters=10"], "run")
    clean_forward = t.job.step.forward

    def nan_forward(x, y):
        logits, loss = clean_forward(x, y)
        return logits, loss * float("nan") if t.progress.step == 4 else loss

    t.job.step.forward = nan_forward
    result = t.run()
    assert [(e["event"], e["step"]) for e in RunDir(result.run_dir).events() if e["event"] == "skip"] == [("skip", 5)]
    assert all(torch.isfinite(p).all() for p in t.job.model.parameters())
    assert t.job.step.optimizer.adamw.state_dict()["state"][0]["step"].item() == 9  # 10 steps, one skipped


def _muon_moves(optimizer: type, **settings) -> list[torch.Tensor]:
    """How far four Muon steps on seeded random gradients move five matrices (wide, tall, square; two shapes twice)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((24, 40), (48, 16), (32, 32), (24, 40), (32, 32))]
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
    for stack in (Muon.stack, 24 * 40):  # a shape's matrices stacked whole, and one matrix at a time
        stacked = type("Stacked", (Muon,), {"stack": stack})
        assert all(torch.equal(a, b) for a, b in zip(torchs, _muon_moves(stacked, ns_dtype=torch.bfloat16)))
    for a, b in zip(torchs, _muon_moves(Muon, ns_dtype=torch.float32)):
        assert 0 < (a - b).abs().max() < 0.02 * a.abs().max()  # the same moves but for bf16's rounding
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fake_cpu(monkeypatch, "avx2")
    assert orthogonal_dtype(cpu) == torch.float32
    fake_cpu(monkeypatch, "avx512-bf16")
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


def test_the_names_train_optimizer_takes_are_the_table_and_fsdp_refuses_what_it_cannot_shard():
    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)  # a name train.optimizer takes is one lmlab builds
    assert all(name in config_page() for name in OPTIMIZERS)  # and the config reference lists each
    for name, entry in OPTIMIZERS.items():
        if entry.unsharded:
            with pytest.raises(UserError, match=f'optimizer = "{name}" does not work with train.parallel = "fsdp"'):
                optimizer_of(TrainConfig(optimizer=name, parallel="fsdp"))
        else:
            assert optimizer_of(TrainConfig(optimizer=name, parallel="fsdp")) is entry
    shape = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=43)
    adamw, muon = (training_need(shape, OPTIMIZERS[name].state_bytes).fixed for name in ("adamw", "muon"))
    assert muon < adamw  # Muon keeps one momentum for the hidden matrices, AdamW two moments for every weight


# The contract every entry of OPTIMIZERS meets, so a new one needs no test of its own: a tiny model, its steps as
# training takes them (lmlab.train.step.TrainStep), its state through the checkpoint code resume uses.
TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=23)


def _train_step(name: str, seed: int) -> TrainStep:
    torch.manual_seed(seed)
    return TrainStep(build_model(TINY), TrainConfig(optimizer=name, compile=False), a_machine())


def _batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.block_size + 1), generator=torch.Generator().manual_seed(seed))
    return [(ids[:, :-1], ids[:, 1:])]


def _copies(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _state(optimizer) -> list[torch.Tensor]:
    return _copies(t for state in optimizer.state_dict()["state"].values() for t in state.values()
                   if isinstance(t, torch.Tensor))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cpu", ["avx2", "avx512-bf16"])  # Muon orthogonalises in float32, in bfloat16
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_skips_a_non_finite_step_resumes_bitwise_and_is_sized(name, cpu, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cpu)
    step = _train_step(name, 0)
    first = _copies(step.model.parameters())
    step(_batch(0), 1, 1e-2)
    moved = _copies(step.model.parameters())
    assert not _same(first, moved) and all(torch.isfinite(p).all() for p in moved)
    # A step whose loss is not finite leaves the weights and the optimizer's state as they were, bit for bit,
    # however the entry says it skips (found_inf).
    state, clean = _state(step.optimizer), step.forward
    step.forward = lambda x, y: (lambda out: (out[0], out[1] * float("nan")))(clean(x, y))
    step(_batch(1), 1, 1e-2)
    step.forward = clean
    assert _same(_copies(step.model.parameters()), moved) and _same(_state(step.optimizer), state)
    # Through a checkpoint into another model and optimizer, the next step is the one it would have been.
    folder = save_checkpoint(tmp_path, 1, model_tensors(step.model), step.optimizer.state_dict(), {}, best=False)
    resumed = _train_step(name, 1)
    load_checkpoint(folder, resumed.model, resumed.optimizer)
    for each in (step, resumed):
        each(_batch(2), 1, 1e-2)
    assert _same(_copies(resumed.model.parameters()), _copies(step.model.parameters()))
    # The memory check's count of its state is what it holds (but a step counter per parameter).
    params = [p for p in step.model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    hidden = sum(p.numel() * p.element_size() for p in step.model.hidden_matrices())
    held = sum(t.numel() * t.element_size() for t in _state(step.optimizer))
    assert abs(held - OPTIMIZERS[name].state_bytes(weights, hidden)) <= 8 * len(params), (held, weights, hidden)


@pytest.mark.slow
def test_every_optimizer_trains_checkpoints_and_resumes_without_loading_the_compiler(tmp_path, char_dataset):
    """Training eager never imports torch._dynamo, which torch's optimizer methods import at their first call for
    torch.compile's sake, and which costs a CPU run's start about a second (benchmarks/startup.py): every entry of
    OPTIMIZERS trains, checkpoints and resumes through `lmlab.train` in a process without it. The second such
    process: the first measures the models' memory on the meta device, whose decompositions import it, and keeps
    the estimates (lmlab.model.memory.remembered)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=2)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for start, resume in (("first", ""), ("second", "    lmlab.train(resume=run, max_iters=3)\n")):
        code = ("import sys, lmlab\n"
                f"for name in {list(OPTIMIZERS)!r}:\n"
                f"    run = lmlab.train({str(config)!r}, run={str(tmp_path / start)!r} + '/' + name, optimizer=name, "
                f"device='cpu')\n{resume}"
                "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"
