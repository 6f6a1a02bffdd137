"""Memory estimates are kept between processes (lmlab.model.memory.remembered): measuring one runs the model's
forward on the meta device, which imports torch's compiler stack (seconds at every start of eval, train, sample,
serve); a second start of the same model reads the estimate instead. Which modules a command imported is read
from `python -X importtime`, never from a clock."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.core.config import ModelConfig
from lmlab.model.memory import training_need
from lmlab.train.optim import OPTIMIZERS
from tests.helpers import write_config


@pytest.fixture(scope="session")
def run(tmp_path_factory, char_dataset) -> Path:
    from lmlab.core.config_toml import load_config
    from lmlab.train.loop import Trainer
    from lmlab.train.preflight import train_job

    root = tmp_path_factory.mktemp("sized")
    return Trainer(train_job(load_config(write_config(root / "tiny.toml", char_dataset, max_iters=2),
                                         ["train.eval_interval=2"]), root / "run", "cpu")).run().run_dir


def evaluate(run: Path, cache: Path) -> tuple[bool, str]:
    """`lmlab eval RUN` in its own process with `cache` as its cache folder: whether it imported torch._dynamo, and
    its output."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmlab", "eval", str(run), "--max-tokens", "64",
                           "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    return any(line.endswith("| torch._dynamo") for line in done.stderr.splitlines()), done.stdout


def memory_entries(folder: Path) -> list[dict]:
    """The memory estimates the machine cache under `folder` keeps."""
    entries = json.loads((folder / "lmlab" / "machine.json").read_text())["entries"].values()
    return [e for e in entries if e["kind"] == "memory"]


@pytest.mark.slow
def test_a_second_start_reads_the_estimate_instead_of_measuring_it(run, tmp_path):
    first, out = evaluate(run, tmp_path)
    assert first and memory_entries(tmp_path)  # measured on the meta device, and kept
    second, again = evaluate(run, tmp_path)
    assert not second and json.loads(again)["loss"] == json.loads(out)["loss"]


@pytest.mark.slow
def test_a_damaged_or_unwritable_cache_is_passed_over(run, tmp_path):
    (tmp_path / "lmlab").mkdir()
    (tmp_path / "lmlab" / "machine.json").write_text("{not json")
    measured, _ = evaluate(run, tmp_path)
    assert measured and memory_entries(tmp_path)  # written anew
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    assert evaluate(run, blocked)[0]  # measured each time, and no error


def test_each_model_keeps_its_own_estimate_and_each_optimizer_sizes_its_state_from_it(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = ModelConfig(n_layer=3, n_head=2, n_embd=48, block_size=40, vocab_size=70, pos_emb="rope")
    adamw, muon = (training_need(config, OPTIMIZERS[name].state_bytes) for name in ("adamw", "muon"))
    wider = training_need(dataclasses.replace(config, n_embd=64), OPTIMIZERS["adamw"].state_bytes)
    kept = memory_entries(tmp_path)
    assert len(kept) == 4  # weights and training measurements per shape; the optimizer's state is arithmetic on them
    assert muon.fixed < adamw.fixed < wider.fixed  # one moment for Muon's matrices; a wider model
    assert muon.each == adamw.each  # the activations do not depend on the optimizer
    assert training_need(config, OPTIMIZERS["adamw"].state_bytes) == adamw


def test_a_shape_on_the_meta_device_imports_no_compiler():
    """A model of each kind and position embedding built as a shape (lmlab.model.memory.on_meta: what the sizing, the
    memory check and a second start build before any estimate is read back) computes nothing on the meta device,
    whose decompositions import torch._dynamo: rotary embeddings' angles are computed on the CPU, then moved."""
    code = ("import sys\nfrom lmlab.core.config import ModelConfig\nfrom lmlab.model.memory import on_meta\n"
            "for kind, pos in (('gpt', 'learned'), ('gpt', 'rope'), ('recurrent', 'learned')):\n"
            "    model = on_meta(ModelConfig(kind=kind, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, "
            "pos_emb=pos))\n"
            "    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()]), (kind, pos)\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"
