"""What a size costs in memory and the checks that refuse one that does not fit (lmlab/model/memory.py), on a CUDA
GPU too, from what torch.cuda reports of it."""

import pytest
import torch

from lmlab.core.config import ModelConfig
from lmlab.model.memory import MemoryRefused, check_decoding, check_training, decoding_need

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
    largest = 21 * 2**30 // per_row
    assert refusal.value.largest == largest == 4
    assert "the GPU (cuda:0) has 21.0 GiB free" in str(refusal.value)
    assert f"the largest that fits is {largest}: set --max-batch to {largest} or less" in str(refusal.value)
    check_decoding(QWEN3, largest, QWEN3.block_size, "--max-batch", torch.device("cuda"), torch.bfloat16)


def test_a_training_step_on_a_gpu_is_left_to_the_allocator(fake_gpu):
    fake_gpu(free=2**30)
    check_training(QWEN3, 64, "adamw", torch.device("cuda"))  # far beyond 1 GiB: the allocator says so itself
