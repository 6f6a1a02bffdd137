"""The decisions the CUDA paths rest on, checked on the CPU: the dtype a GPU gets, the pinned whole-batch copy,
the grad scaler's skips under the spike guard, the compile fallback and reset, FSDP's precision, the chunked eval
loss, the mask-free prompt into a decode cache, per-rank seeds, GPU choice and stop votes, the memory budget and TF32.
(tests/test_cuda.py runs the same paths on a GPU; the datasheet table is tested in tests/test_bench.py.)"""

import json
import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch.overrides import TorchFunctionMode

from lmlab.core.config import ModelConfig, SamplingParams, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.device import compile_choice, configure, dtype_for_capability
from lmlab.core.errors import UserError
from lmlab.core.peak import choose_dtype
from lmlab.data.loader import BatchLoader
from lmlab.evals.evaluate import score
from lmlab.experiments.bench import BenchRow, memory_budget, within
from lmlab.inference.generate import stream_ids
from lmlab.model.gpt import GPT
from lmlab.model.loss import IGNORE, next_token_loss
from lmlab.run.rundir import RunDir
from lmlab.train.distributed import Parallel, cuda_index
from lmlab.train.guard import MAX_OVERFLOWS, SpikeGuard
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job, weights_born_in
from lmlab.train.step import TrainStep
from tests.helpers import a_machine, write_config


@pytest.mark.parametrize("capability, dtype", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((12, 0), torch.bfloat16),
    ((7, 5), torch.float16), ((7, 0), torch.float16),  # T4, RTX 20xx, V100: fp16 and the grad scaler
    ((6, 1), torch.float32),  # Pascal: no tensor cores
])
def test_auto_dtype_follows_the_compute_capability_not_emulated_bf16(capability, dtype):
    assert dtype_for_capability(capability) == dtype


class CountingTokens:
    """A token array that counts the windows read from it."""

    def __init__(self, n: int):
        self.tokens, self.reads = np.arange(n, dtype=np.uint16), 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        self.reads += 1
        return self.tokens[index]


def test_a_batch_is_built_whole_and_inputs_and_targets_are_views_of_it():
    loader = BatchLoader(np.arange(1000, dtype=np.uint16), 8, 4, seed=1)
    again = BatchLoader(np.arange(1000, dtype=np.uint16), 8, 4, seed=1)
    whole = again.host_batch()
    assert whole.shape == (4, 9) and whole.is_contiguous()  # the one tensor a GPU run pins and copies
    x, y = loader.next()
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one copy, sliced after it
    assert torch.equal(x, whole[:, :-1]) and torch.equal(y, whole[:, 1:])


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_builds_only_its_own_micro_batches(world):
    tokens = CountingTokens(1000)
    loader = BatchLoader(tokens, 8, 2, seed=5)
    batches = list(Parallel(1, 1, world).micro_batches(loader, 8))
    assert len(batches) == 8 // world and tokens.reads == 2 * len(batches)  # two windows per batch, no more
    alone = BatchLoader(np.arange(1000, dtype=np.uint16), 8, 2, seed=5)
    list(Parallel().micro_batches(alone, 8))
    assert loader.state_dict() == alone.state_dict()  # the others' batches were drawn, so the loaders agree


def test_the_scalers_overflow_skips_are_not_bad_steps_unless_they_never_end():
    guard = SpikeGuard(zscore=6.0, patience=3, warmup=0, min_samples=1000)
    assert [guard.judge(2.0, math.inf, scaled=True) for _ in range(MAX_OVERFLOWS)] == ["overflow"] * MAX_OVERFLOWS
    assert guard.bad_in_row == 0 and guard.lr_scale == 1.0
    assert guard.judge(2.0, math.inf, scaled=True) == "skip"  # the gradients overflow even unscaled
    assert guard.judge(2.0, 1.0, scaled=True) == "ok" and guard.overflows_in_row == 0
    assert guard.judge(math.nan, math.inf, scaled=True) == "skip"  # a non-finite loss is never the scaler's
    assert guard.judge(2.0, math.inf) == "skip"  # without the scaler nothing skips on its own
    restored = SpikeGuard(zscore=6.0, patience=3)
    restored.load_state_dict({k: v for k, v in guard.state_dict().items() if k != "overflows_in_row"})  # older file
    assert restored.overflows_in_row == 0


@pytest.mark.slow
def test_fp16_training_rides_out_the_scalers_overflows_without_a_rollback(tmp_path, char_dataset):
    """A real fp16 run (autocast and the grad scaler work on the CPU too) whose scaler starts at 2**28: its first
    steps overflow fp16 and are skipped by the scaler while it halves its scale. The guard counts none of them as a
    bad step: the run is never rolled back and its LR never halved for them."""
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=40),
                      ["train.dtype=float16", "train.log_interval=1"])
    trainer = Trainer(train_job(cfg, tmp_path / "run", "cpu"))
    trainer.job.step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 28)
    trainer.run()
    events = RunDir(tmp_path / "run").events()
    train = [e for e in events if e["event"] == "train"]
    finite = [e["grad_norm"] is not None and math.isfinite(e["grad_norm"]) for e in train]  # null: inf or NaN
    first_finite = finite.index(True)
    # The first steps overflow in a row; a later step may overflow again at the halved scale (how often depends
    # on fp16 rounding), and the scaler skips it the same way.
    assert first_finite >= 3
    assert not [e for e in events if e["event"] in ("skip", "spike", "rollback")] and trainer.guard.lr_scale == 1.0
    assert train[-1]["loss"] < train[first_finite]["loss"] - 0.5  # and then it learned


@pytest.mark.slow
def test_tokens_per_second_leaves_out_the_warm_up_step(tmp_path, char_dataset):
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=4), ["train.log_interval=1"])
    Trainer(train_job(cfg, tmp_path / "run", "cpu")).run()
    start, *events = RunDir(tmp_path / "run").events()
    train = [e for e in events if e["event"] == "train"]
    assert train[0]["tokens_per_sec"] is None and train[0]["mfu"] is None  # the first step's line has no rate
    # MFU wherever a peak is known, measured quiet (none against a busy one: lmlab.core.peak)
    assert start["peak_flops"] > 0 and all(e["tokens_per_sec"] > 0 and ((e["mfu"] or 0) > 0) is start["peak_quiet"]
                                           for e in train[1:])


@pytest.mark.parametrize("setting, device, triton, compiled, note", [
    ("auto", "cuda", True, True, False), ("auto", "cuda", False, False, True), (False, "cuda", True, False, False),
    ("auto", "cpu", False, False, False), (True, "cpu", False, True, True),  # Inductor's CPU backend is C++, slow
])
def test_compile_auto_runs_eager_where_triton_is_missing(setting, device, triton, compiled, note):
    assert compile_choice(setting, device, triton)[0] is compiled
    assert (compile_choice(setting, device, triton)[1] is not None) is note


def test_compile_true_without_triton_on_a_gpu_is_refused():
    with pytest.raises(UserError, match="train.compile = true needs Triton"):
        compile_choice(True, "cuda", False)


@pytest.mark.slow
def test_each_compiled_model_starts_from_a_reset_compiler():
    """Dynamo's caches are per process: a sweep that compiled model after model would pass the recompile limit
    and run the rest eager. Building a compiled step resets them (a function compiled before compiles again)."""
    counter = CompileCounter()
    double = torch.compile(lambda t: t * 2, backend=counter)
    double(torch.ones(2))
    double(torch.ones(2))
    assert counter.frame_count == 1  # cached
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    TrainStep(model, TrainConfig(compile=True), a_machine())
    double(torch.ones(2))
    assert counter.frame_count == 2


def test_the_eval_loss_in_chunks_equals_the_whole_batch():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7, 11), torch.randint(0, 11, (5, 7))
    targets[1, 3:] = IGNORE
    whole = next_token_loss(logits, targets, reduction="sum").item()
    correct = int((logits.argmax(-1) == targets).sum())
    for max_elements in (1, 7 * 11, 2 * 7 * 11, 2**28):  # one sequence at a time, two, everything at once
        losses, right = score(logits, targets, max_elements)
        assert losses.shape == (5,) and losses.sum().item() == pytest.approx(whole, rel=1e-6) and right == correct
        assert losses[1].item() == pytest.approx(next_token_loss(logits[1:2, :3], targets[1:2, :3], "sum").item())


class AttentionCalls(TorchFunctionMode):
    """Records the attention mask and causal flag of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((kwargs.get("attn_mask") is not None, kwargs.get("is_causal", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("extra", [{}, {"pos_emb": "rope", "n_kv_head": 1}])
def test_the_prompt_into_an_empty_cache_builds_no_attention_mask(extra):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=20, **extra)).eval()
    with AttentionCalls() as attention:
        list(stream_ids(model, [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0)))
    # The prompt: causal, no mask, 2 layers. The single-token steps call no SDPA: they attend through
    # attention.attend_written_out, whose per-row mask lets sequences at different positions decode in one batch.
    assert attention.calls == [(False, True)] * 2
    cache = model.new_cache(1, torch.device("cpu"), torch.float32)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with AttentionCalls() as attention:
        model(torch.tensor([[4, 5]]), cache=cache)
    assert attention.calls == [(True, False)] * 2  # several new tokens after a cache still need the mask


def test_ranks_other_than_0_draw_their_own_dropout_masks():
    def draws(parallel: Parallel, step: int) -> torch.Tensor:
        torch.manual_seed(7)
        parallel.own_rng(7, step)
        return torch.rand(4)

    alone = draws(Parallel(), 0)
    torch.manual_seed(7)
    assert torch.equal(alone, torch.rand(4))  # rank 0 (and one process) keeps the stream it had
    rank1, rank2 = draws(Parallel(1, 1, 2), 0), draws(Parallel(2, 2, 4), 0)
    assert not torch.equal(rank1, alone) and not torch.equal(rank2, rank1)
    assert torch.equal(draws(Parallel(1, 1, 2), 0), rank1)  # from (seed, rank, step): a resume redraws them
    assert not torch.equal(draws(Parallel(1, 1, 2), 10), rank1)


def test_each_process_finds_its_gpu_whether_it_sees_all_of_them_or_only_its_own():
    assert cuda_index(3, 8, 8) == 3  # torchrun on a node: every process sees the 8 GPUs
    assert cuda_index(3, 8, 1) == 0  # SLURM --gpus-per-task=1: each sees its own as cuda:0
    with pytest.raises(UserError, match=r"8 processes on this node share 4 visible GPUs.*--nproc_per_node=4"):
        cuda_index(3, 8, 4)


def test_the_stop_vote_answers_one_step_late_without_waiting(tmp_path):
    """In a real (one-process) Gloo job: each call starts a vote and returns the previous one's result."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        parallel = Parallel(0, 0, 1)
        parallel._flags = dist.new_group(backend="gloo")
        assert parallel.agree(True, False) == (False, False)
        assert parallel.agree(False, False) == (True, False)
        assert parallel.agree(False, True) == (False, False)
        assert parallel.agree(False, False) == (False, True)
    finally:
        parallel.close()
    assert not dist.is_initialized() and Parallel().agree(True, False) == (True, False)  # one process: at once


def test_a_batch_fits_only_within_the_budget_that_keeps_headroom():
    assert within(BenchRow(8, peak_memory=90), 100) and not within(BenchRow(8, peak_memory=101), 100)
    assert not within(BenchRow(8, out_of_memory=True), None)
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    assert 0.7 * available < memory_budget(torch.device("cpu")) < 0.9 * available  # 20% of the RAM left free


def test_tf32_is_set_through_the_current_api_without_a_warning_and_the_legacy_getters_still_answer():
    """configure() is what training, eval, sample and serve call (RunDir.load); for a CUDA device it turns TF32
    on. Setting the flags needs no GPU, so this runs anywhere. After it, torch's legacy getters (Inductor's
    autotuning and plugins read them) answer, where `fp32_precision` set alone made them raise "mix of the legacy
    and new APIs"."""
    conv = torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            configure(torch.device("cuda"))
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
            assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")  # torch's default, both APIs at once
        torch.backends.cudnn.conv.fp32_precision = conv


def test_a_run_on_weights_born_in_bf16_computes_in_fp32_on_a_gpu_without_bf16(tmp_path, fake_gpu):
    """fp16 overflows the activations of weights trained in bf16 (NaN, "!!!!" text): training them further on a T4,
    resumed or from another run's weights, takes fp32, as loading them does; a new run from scratch keeps fp16 and its
    grad scaler."""
    fake_gpu(name="Tesla T4", capability=(7, 5))
    born = tmp_path / "bf16"  # a run trained in bf16 on an A100, as its start event says
    born.mkdir()
    (born / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0, "kind": "trained",
                                                    "dtype": "bfloat16"}) + "\n")
    cuda, new = torch.device("cuda"), RunDir(tmp_path / "new")
    for run, init_from in ((RunDir(born), None), (new, f"{born}:best"), (new, str(born))):
        dtype, why = choose_dtype(cuda, "auto", weights_born_in(run, init_from))
        assert dtype == torch.float32 and "trained in bfloat16" in why
    assert choose_dtype(cuda, "auto", weights_born_in(new, None))[0] == torch.float16


def test_a_checkpoint_is_read_into_host_memory_whatever_device_the_model_is_on(tmp_path, monkeypatch):
    """A rollback or resume copies a checkpoint's tensors from host memory into the ones training holds, so a GPU
    never holds a second copy (run/checkpoint.py's load_checkpoint). A model "on the GPU" (its parameters reporting
    cuda:0 to whoever asks, as a reverted load would ask) must still be read with device="cpu": safetensors' loaders
    are faked to record the device they are asked for."""
    import safetensors.torch

    import lmlab.run.checkpoint as checkpoint

    model = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=11))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    folder = checkpoint.save_checkpoint(tmp_path, 1, checkpoint.model_tensors(model), optimizer.state_dict(), {},
                                        best=False)
    asked = []
    load_model, load_file = safetensors.torch.load_model, safetensors.torch.load_file

    def recording(real):  # noqa: ANN001, ANN202
        def load(*args, device="cpu", **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            asked.append(str(device))
            return real(*args, device="cpu", **kwargs)
        return load

    monkeypatch.setattr(safetensors.torch, "load_model", recording(load_model))  # imported where they are called
    monkeypatch.setattr(safetensors.torch, "load_file", recording(load_file))
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    parameters = model.parameters
    monkeypatch.setattr(model, "parameters", lambda recurse=True: iter([on_gpu, *parameters(recurse)]))
    held = {key: value for key, value in optimizer.state_dict()["state"][0].items() if torch.is_tensor(value)}
    checkpoint.load_checkpoint(folder, model, optimizer)
    assert len(asked) >= 2 and set(asked) == {"cpu"}  # the weights, the optimizer's state (load_model calls load_file)
    assert all(optimizer.state_dict()["state"][0][key] is value for key, value in held.items())  # copied in place
