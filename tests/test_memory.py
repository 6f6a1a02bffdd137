"""What a size costs in memory and the checks that refuse one that does not fit (lmlab/model/memory.py), on a CUDA
GPU too, from what torch.cuda reports of it; every size that multiplies memory refused by every command before it is
allocated, and the training estimate near the peak a step measures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.memory_estimate import measured
from benchmarks.prefill_memory import prefill_peak
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.errors import UserError
from lmlab.model import build_model
from lmlab.model.memory import (
    MemoryRefused,
    check_decoding,
    check_fits,
    check_training,
    decoding_need,
    fit_micro_batch,
    prefill_bytes,
    training_need,
)
from lmlab.run.rundir import RunDir
from lmlab.train.optim import OPTIMIZERS
from tests.helpers import ALPACA_TINY, refused, write_config

# An imported Qwen3-0.6B's shape at its full context: 28 layers, 8 KV heads of 128, 40,960 positions.
QWEN3 = ModelConfig(n_layer=28, n_head=16, n_kv_head=8, head_dim=128, n_embd=1024, block_size=40960,
                    vocab_size=151936, pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False,
                    mlp_hidden=3072)


def test_decoding_rows_on_a_gpu_are_checked_against_its_free_memory(fake_gpu):
    fake_gpu(free=20 * 2**30, reserved=3 * 2**30, allocated=2 * 2**30)  # 1 GiB held unused by the allocator
    per_row = decoding_need(QWEN3, torch.bfloat16, QWEN3.block_size).each
    assert 4.3 * 2**30 < per_row < 4.5 * 2**30  # every layer's keys and values, 40,960 positions in bf16
    with pytest.raises(MemoryRefused) as refusal:
        check_decoding(QWEN3, 16, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)
    # 10% of it left for CUDA's workspaces and fragmentation, and a prompt's prefill beside the rows
    largest = (int(0.9 * 21 * 2**30) - prefill_bytes(QWEN3, torch.bfloat16)) // per_row
    assert refusal.value.largest == largest == 3
    assert "the GPU (cuda:0) has 21.0 GiB free (10% of it left for CUDA's workspaces" in str(refusal.value)
    assert f"the largest that fits is {largest}: set --max-batch to {largest} or less" in str(refusal.value)
    check_decoding(QWEN3, largest, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)
    fake_gpu(free=int(3.2 * per_row))  # three rows fit the free memory, but not beside the headroom
    with pytest.raises(MemoryRefused):
        check_decoding(QWEN3, 3, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)


def test_a_prompts_prefill_is_counted_beside_the_rows_of_a_loaded_model(fake_gpu):
    per_row = decoding_need(QWEN3, torch.bfloat16, QWEN3.block_size).each
    prefill = prefill_bytes(QWEN3, torch.bfloat16)
    assert 1.5 * 2**30 < prefill < 4 * 2**30  # one layer's activations over 40,960 tokens, not the whole model's
    fake_gpu(free=int((2 * per_row + prefill // 2) / 0.9))  # two rows fit, but not beside a long prompt's prefill
    with pytest.raises(MemoryRefused, match="the largest that fits is 1"):
        check_decoding(QWEN3, 2, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)
    fake_gpu(free=int((2 * per_row + prefill) / 0.9) + 2**20)
    check_decoding(QWEN3, 2, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefill_estimate_is_above_the_peak_a_prefill_measures_and_near_it(dtype):
    """benchmarks/prefill_memory.py measures more shapes and lengths."""
    config = ModelConfig(n_layer=2, n_head=8, n_kv_head=2, n_embd=256, block_size=1024, vocab_size=512,
                         pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)
    peak = prefill_peak(config, dtype)
    assert peak < prefill_bytes(config, dtype) < 4 * peak, (peak, prefill_bytes(config, dtype))


def test_a_training_step_on_a_gpu_is_left_to_the_allocator(fake_gpu):
    fake_gpu(free=2**30)
    check_training(QWEN3, 64, "adamw", torch.device("cuda"))  # far beyond 1 GiB: the allocator says so itself


@pytest.mark.slow
def test_every_size_that_multiplies_memory_is_refused_before_it_is_allocated(capsys, tmp_path, tiny_run, imported_gpt2):
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    huge = "100000000"
    cases = [(["train", config, "--run", tmp_path / "new", "--set", f"train.batch_size={huge}"], "train.batch_size"),
             (["finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / "tuned", "--set",
               f"finetune.batch_size={huge}"], "finetune.batch_size"),
             (["bench", config, "--batch-sizes", huge], "--batch-sizes"),
             (["sample", tiny_run, "--num-samples", huge], "--num-samples"),
             (["answer", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / "a.jsonl", "--batch-size", huge],
              "--batch-size"),
             (["serve", tiny_run, "--max-batch", huge, "--port", "0", "--no-compile"], "--max-batch")]
    for args, setting in cases:
        line = refused(capsys, *args, needles=(f"{setting} 100,000,000 needs about", "the largest that fits is"))
        largest = int(line.split("the largest that fits is ")[1].split(":")[0].replace(",", ""))
        assert 0 < largest < 10**8, line
    assert not (tmp_path / "new").exists() and not (tmp_path / "tuned").exists() and not (tmp_path / "a.jsonl").exists()
    refused(capsys, "train", config, "--run", tmp_path / "new", "--set", "model.n_embd=1000000000000", "--set",
            "model.n_head=1", needles=("more memory than can be counted",))
    # a table of token pairs as large as a large vocabulary's pairs: the sentence names the setting that made it so
    with pytest.raises(UserError, match=r"bigram_buckets 1099511627776 and vocab_size 50257 needs .* make it smaller"):
        build_model(ModelConfig(n_layer=1, n_head=1, n_embd=64, vocab_size=50257, bigram_buckets=2**40))


def test_the_largest_size_that_fits_fits_and_one_more_does_not():
    need = training_need(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=43))
    have = need.at(1000) + need.each // 2
    check_fits(need, 1000, "train.batch_size", "sequence", have=have)
    with pytest.raises(MemoryRefused) as refusal:
        check_fits(need, 1001, "train.batch_size", "sequence", have=have)
    assert refusal.value.largest == 1000


@pytest.mark.slow
def test_the_training_estimate_is_near_the_peak_a_step_measures():
    """The estimate of a step's memory beside the peak RSS a real step reaches (weights already resident), for
    a shape whose activations dominate; benchmarks/memory_estimate.py measures more shapes."""
    shape = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128, "vocab_size": 65, "pos_emb": "rope",
             "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False}
    peak = measured(shape, 16, "float32", threads=1)
    need = training_need(ModelConfig(**shape))
    estimate = need.at(16) - need.fixed // 4  # the weights (a quarter of the fixed part) were in memory before
    assert 0.8 < estimate / peak < 1.5, (estimate, peak)


@pytest.mark.parametrize("world", [1, 2])
def test_auto_micro_batch_on_a_gpu_is_the_largest_that_fits_and_accumulates_to_the_same_batch(fake_gpu, world):
    """Over GPUs of 1 to 256 GiB free (faked): the micro-batch is 16 times a power of two, the micro-batches make the
    config's 16 x 32 (a multiple of the processes), its estimate is within the free memory less the headroom, and the
    next larger one that divides the batch is not; 16 where no larger one fits."""
    model = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=256, vocab_size=50257)
    train = TrainConfig(batch_size=16, grad_accum_steps=32)
    state = OPTIMIZERS["adamw"].state_bytes
    need, said, seen = training_need(model, state), [], set()
    for gib in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256):
        fake_gpu(free=gib * 2**30)
        fitted = fit_micro_batch(model, train, state, torch.device("cuda"), world, said.append)
        micro, have = fitted.batch_size, int(0.9 * gib * 2**30)
        assert micro * fitted.grad_accum_steps == 16 * 32 and fitted.grad_accum_steps % world == 0
        assert micro % 16 == 0 and (micro // 16) & (micro // 16 - 1) == 0 and fitted.micro_batch == "set"
        assert micro == 16 or need.at(micro) <= have
        assert (16 * 32 // world) % (2 * micro) or need.at(2 * micro) > have
        seen.add(micro)
    assert len(seen) > 3 and max(seen) == 16 * 32 // world  # the range reaches from 16 to the whole batch
    assert said[-1].startswith(f"micro-batch: {16 * 32 // world} x {world} accumulated, for 16 x 32 (train.micro_batch")


def test_a_set_micro_batch_and_a_cpus_are_left_as_they_are(fake_gpu):
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)
    state = OPTIMIZERS["adamw"].state_bytes
    auto, fixed = TrainConfig(batch_size=4, grad_accum_steps=8), TrainConfig(batch_size=4, grad_accum_steps=8,
                                                                             micro_batch="set")
    assert fit_micro_batch(model, auto, state, torch.device("cpu"), 1, print) is auto
    fake_gpu(free=256 * 2**30)
    assert fit_micro_batch(model, fixed, state, torch.device("cuda"), 1, print) is fixed
    assert fit_micro_batch(model, auto, state, torch.device("cuda"), 1, print).batch_size == 32
