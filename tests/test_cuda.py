"""The CUDA paths on a real GPU: bf16 and compiled training against fp32 eager, fused AdamW's non-finite skip,
the fp16 grad scaler through a checkpoint, TF32, checkpoints that move between the GPU and the CPU, KV-cache
sampling, the decode step replayed as CUDA graphs against eager, torchrun over NCCL (DDP, FSDP2 in bf16, and
FSDP with compile), a real out-of-memory in `bench --find-max-batch`, and the choices tests/test_cuda_on_cpu.py checks
on the CPU (dtype, pinning, compile, peak FLOP/s).

Every test here is marked `cuda` and skipped, saying why, where PyTorch sees no GPU (tests/conftest.py);
`python benchmarks/gpu_report.py` (`make gpu-report`) runs them and puts the result in its table. The tolerances
follow the CPU's measured ones (tests/test_train_compile.py) with room for TF32 and CUDA's kernels; they have not yet
been measured on a GPU: each test records the gap it measured (`record_property`), which the report's first-hour
checklist prints beside its bound.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.core.config import ModelConfig, SamplingParams, TrainConfig
from lmlab.core.config_toml import load_config
from lmlab.core.device import configure, datasheet_peak, dtype_for_capability
from lmlab.core.peak import autocast_dtype, measured_peak, peak_flops
from lmlab.data.loader import BatchLoader
from lmlab.experiments.bench import bench_batch, find_max_batch, memory_budget
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.generate import stream_ids
from lmlab.inference.graphs import GraphStep, cuda_graph
from lmlab.inference.steps import build_step, choose_step
from lmlab.model.gpt import GPT
from lmlab.run.checkpoint import model_tensors
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.step import TrainStep
from tests.helpers import a_machine, chosen, write_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
BF16_TOLERANCE = 2e-2  # per-step loss, bf16 autocast against fp32 (TF32) over 50 steps; the CPU measured 5e-4
COMPILE_TOLERANCE = 1e-3  # compiled against eager, both fp32 (TF32); the CPU measured 5e-7
DEVICE_TOLERANCE = 1e-2  # the same steps on the GPU (TF32) and on the CPU (fp32)
REPEAT_TOLERANCE = 1e-4  # the same steps twice on the GPU: only CUDA's atomic adds differ
COMPILED_DECODE_TOLERANCE = 5e-2  # decode-step logits, graphs against eager, in bf16 or fp16: a few bf16 ulps of ~4


def train(tmp_path: Path, dataset: Path, name: str, settings: list[str], device: str = "cuda",
          max_iters: int = 20) -> Trainer:
    cfg = load_config(write_config(tmp_path / f"{name}.toml", dataset, max_iters=max_iters),
                      ["train.log_interval=1", "train.compile=false", *settings])
    trainer = Trainer(train_job(cfg, tmp_path / name, device))
    trainer.run()
    return trainer


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in RunDir(run).events() if e["event"] == "train"}


def resume(run: Path, copy: Path, step: int, device: str, settings: Iterable[str] = ()) -> dict[int, float]:
    """Continue a copy of `run` from its checkpoint at `step` on `device` to its end; the losses after `step`."""
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    Trainer(train_job(load_config(copy / "config.toml", list(settings)), copy, device, resume=True)).run()
    after = {s: v for s, v in losses(copy).items() if s > step}
    assert sorted(after) == [s for s in sorted(losses(run)) if s > step]
    return after


def close(got: dict[int, float], want: dict[int, float], tolerance: float, record=None, what: str = "") -> bool:
    """Whether the steps of `got` (at least one) were all taken in `want` too, with losses within `tolerance`; with
    `record` (pytest's record_property), the gap measured is kept as `what` for the GPU report's checklist."""
    if not got or not set(got) <= set(want):
        return False
    gap = max(abs(got[s] - want[s]) for s in got)
    if record is not None:
        record(f"tolerance {what}", f"{gap:.2g} of {tolerance:g}")
    return gap < tolerance


def test_auto_picks_the_dtype_of_this_gpus_compute_capability():
    capability = torch.cuda.get_device_capability()
    assert autocast_dtype(CUDA, "auto") == dtype_for_capability(capability)


def test_batches_are_pinned_whole_and_sliced_on_the_gpu():
    tokens = np.arange(1000, dtype=np.uint16)
    gpu, cpu = BatchLoader(tokens, 8, 4, seed=1, device=CUDA), BatchLoader(tokens, 8, 4, seed=1)
    assert gpu.host_batch().is_pinned()
    cpu.next()
    x, y = gpu.next()
    assert x.device.type == "cuda" and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    want = cpu.next()
    assert torch.equal(x.cpu(), want[0]) and torch.equal(y.cpu(), want[1])


def test_compile_auto_compiles_here():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)).to(CUDA)
    assert TrainStep(model, TrainConfig(), a_machine("cuda")).note is None  # Triton is there


def test_the_datasheet_peak_is_not_below_what_a_matmul_reaches():
    """A datasheet row below the measured rate would overstate MFU; an unlisted GPU is measured."""
    configure(CUDA)  # fp32 runs at the TF32 rate, as the table counts it
    for dtype in (autocast_dtype(CUDA, "auto"), torch.float32):
        peak = peak_flops(CUDA, dtype)
        listed = datasheet_peak(torch.cuda.get_device_name(), dtype)
        assert peak.source == (listed[1] if listed else "measured matmul")
        assert 1e12 < measured_peak(CUDA, dtype) <= 1.05 * peak.flops


def test_bf16_and_compiled_training_track_fp32_eager_on_the_gpu(tmp_path, char_dataset, record_property):
    reference = losses(train(tmp_path, char_dataset, "fp32", ["train.dtype=float32"], max_iters=50).job.run_dir.path)
    bf16 = losses(train(tmp_path, char_dataset, "bf16", ["train.dtype=bfloat16"], max_iters=50).job.run_dir.path)
    compiled = losses(train(tmp_path, char_dataset, "compiled", ["train.dtype=float32", "train.compile=true"],
                            max_iters=50).job.run_dir.path)
    assert len(reference) == 50 and reference[50] < reference[1] - 0.5
    assert close(bf16, reference, BF16_TOLERANCE, record_property, "bf16 against fp32")
    assert close(compiled, reference, COMPILE_TOLERANCE, record_property, "compiled against eager")


def test_fused_adamw_skips_a_non_finite_step_on_the_gpu(tmp_path, char_dataset):
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10),
                      ["train.log_interval=1", "train.compile=false"])
    trainer = Trainer(train_job(cfg, tmp_path / "run", "cuda"))
    clean = trainer.job.step.forward

    def nan_at_step_5(x, y):
        logits, loss = clean(x, y)
        return logits, loss * float("nan") if trainer.progress.step == 5 else loss

    trainer.job.step.forward = nan_at_step_5  # type: ignore[assignment]  # a forward that poisons one step
    trainer.run()
    events = RunDir(tmp_path / "run").events()
    assert [(e["event"], e["step"]) for e in events if e["event"] in ("skip", "rollback")] == [("skip", 6)]
    assert all(torch.isfinite(p).all() for p in trainer.job.model.parameters())
    steps = {float(s["step"]) for s in trainer.job.step.optimizer.state_dict()["state"].values()}
    assert steps == {9.0}  # the skipped step moved neither the weights nor the moments nor the step count


def test_the_fp16_grad_scaler_trains_and_resumes_from_its_checkpointed_state(tmp_path, char_dataset,
                                                                             record_property):
    run = train(tmp_path, char_dataset, "fp16", ["train.dtype=float16"]).job.run_dir.path
    state = json.loads((run / "checkpoints" / "step_000010" / "state.json").read_text())
    assert state["training"]["scaler"]["scale"] > 0
    assert close(resume(run, tmp_path / "again", 10, "cuda"), losses(run), REPEAT_TOLERANCE, record_property,
                 "fp16 resumed against uninterrupted")
    assert not [e for e in RunDir(run).events() if e["event"] in ("skip", "rollback")]  # overflows are the scaler's


def test_tf32_is_on_for_training_and_for_every_loaded_run(tmp_path, char_dataset):
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    run = train(tmp_path, char_dataset, "fp32", ["train.dtype=float32"], max_iters=2).job.run_dir.path
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    RunDir(run).load("latest", "cuda")  # what eval, sample and serve do
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_a_gpu_checkpoint_continues_on_the_cpu_and_a_cpu_one_on_the_gpu(tmp_path, char_dataset, record_property):
    fp32 = ["train.dtype=float32"]
    on_gpu = train(tmp_path, char_dataset, "gpu", fp32).job.run_dir.path
    on_cpu = train(tmp_path, char_dataset, "cpu", fp32, device="cpu").job.run_dir.path
    assert close(losses(on_gpu), losses(on_cpu), DEVICE_TOLERANCE, record_property, "GPU (TF32) against CPU")
    assert close(resume(on_gpu, tmp_path / "gpu-then-cpu", 10, "cpu"), losses(on_gpu), DEVICE_TOLERANCE)
    assert close(resume(on_cpu, tmp_path / "cpu-then-gpu", 10, "cuda"), losses(on_cpu), DEVICE_TOLERANCE)
    gpu_model, cpu_model = RunDir(on_gpu).load("latest", "cuda").model, RunDir(on_gpu).load("latest", "cpu").model
    assert all(torch.equal(t.cpu(), model_tensors(cpu_model)[name]) for name, t in model_tensors(gpu_model).items())


@pytest.mark.parametrize("extra", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "n_kv_head": 1, "qk_norm": True}])
def test_kv_cache_sampling_equals_recompute_on_the_gpu(extra, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")  # TF32 noise could flip a near tie
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=50, **extra)).to(CUDA).eval()
    prompt = [1, 2, 3]
    cached = list(stream_ids(model, prompt, SamplingParams(max_new_tokens=40, temperature=0)))  # past block_size
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids[-32:]], device=CUDA))[0][0, -1].argmax()))
    assert cached[:29] == ids[3:32]  # until the window restarts, where the two see different contexts


def test_decoding_runs_on_flash_attention_alone():
    """One new token needs no mask, so bf16 decoding works where only the flash kernel is allowed."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash attention needs compute capability 8.0")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50)).to(CUDA).eval()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        new = list(stream_ids(model, [1, 2, 3], SamplingParams(max_new_tokens=20), torch.bfloat16))
    assert len(new) == 20


def torchrun(config: Path, run: Path, *settings: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "--",
               "lmlab", "train", str(config), "--run", str(run), "--device", "cuda",
               *[arg for s in ["train.log_interval=1", "train.compile=false", *settings] for arg in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torchrun_over_nccl_with_ddp_and_with_fsdp_in_bf16(tmp_path, char_dataset, record_property):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    alone = train(tmp_path, char_dataset, "alone", ["train.dtype=float32"]).job.run_dir.path
    torchrun(config, tmp_path / "ddp", "train.dtype=float32")
    assert close(losses(tmp_path / "ddp"), losses(alone), REPEAT_TOLERANCE, record_property, "DDP against one process")
    torchrun(config, tmp_path / "fsdp", "train.dtype=bfloat16", 'train.parallel="fsdp"')
    start = RunDir(tmp_path / "fsdp").events()[0]
    assert (start["parallel"], start["world_size"], start["dtype"]) == ("fsdp", 1, "bfloat16")
    assert close(losses(tmp_path / "fsdp"), losses(alone), BF16_TOLERANCE, record_property,
                 "FSDP bf16 against one fp32 process")
    gathered = RunDir(tmp_path / "fsdp").load("latest", "cpu").model  # whole fp32 weights, readable anywhere
    assert all(p.dtype == torch.float32 for p in gathered.parameters())


def test_find_max_batch_stops_at_a_real_out_of_memory_with_headroom(tmp_path):
    """A model whose memory is mostly its activations (8 narrow layers, a small vocabulary), so the GPU fills at a
    batch of thousands whose steps take a moment; the search's limit is far above it, so memory ends the search."""
    config = tmp_path / "deep-narrow.toml"
    config.write_text('[model]\nn_layer = 8\nn_head = 2\nn_embd = 64\nblock_size = 1024\nvocab_size = 256\n'
                      '[train]\ncompile = false\n')
    cfg = load_config(config)
    budget = memory_budget(CUDA)  # 90% of the free memory: what find_max_batch allows a batch
    assert budget is not None
    machine = a_machine("cuda")
    found, finished = find_max_batch(cfg, machine, limit=1 << 20)
    assert finished and found < 1 << 20
    assert bench_batch(cfg, 4 * found, 1, machine, warmup=1).out_of_memory  # caught, not raised
    row = bench_batch(cfg, found, 1, machine, warmup=1)  # and the process trains on afterwards
    assert not row.out_of_memory and row.peak_memory is not None
    assert row.peak_memory <= 1.02 * budget  # (the free memory moves a little)


def test_fsdp_with_compile_trains_as_one_bf16_process_does(tmp_path, char_dataset, record_property):
    """FSDP2's hooks under torch.compile: a graph break or a recompile per step would show as a slow or failed run."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20)
    alone = train(tmp_path, char_dataset, "alone", ["train.dtype=bfloat16", "train.compile=true"]).job.run_dir.path
    torchrun(config, tmp_path / "fsdp", "train.dtype=bfloat16", 'train.parallel="fsdp"', "train.compile=true")
    assert close(losses(tmp_path / "fsdp"), losses(alone), BF16_TOLERANCE, record_property,
                 "FSDP compiled against one compiled process")


def test_a_compiled_run_replays_its_blocks_as_cuda_graphs_by_the_rule_and_trains_as_eager_does(
        tmp_path, char_dataset, record_property):
    """The machine's graphs rule (tests/test_machine.py checks it over its range on the CPU): a compiled one-process
    step this short replays each block as CUDA graphs (torch.compile's reduce-overhead), said in its `machine` event,
    and its losses are eager's; with gradient accumulation it is not graphed, and trains as eager does too."""
    reference = losses(train(tmp_path, char_dataset, "eager", ["train.dtype=float32"]).job.run_dir.path)
    run = train(tmp_path, char_dataset, "graphs", ["train.dtype=float32", "train.compile=true"]).job.run_dir.path
    assert chosen(run, "graphs")[0] == "CUDA graphs", chosen(run, "graphs")
    assert close(losses(run), reference, COMPILE_TOLERANCE, record_property, "graphs against eager")
    accumulated = train(tmp_path, char_dataset, "accumulated", ["train.dtype=float32", "train.compile=true",
                                                                "train.batch_size=4", "train.grad_accum_steps=2"])
    assert chosen(accumulated.job.run_dir.path, "graphs") == (
        "no CUDA graphs", "rule: gradient accumulation (each micro-batch would record graphs of its own)")
    record_property("graphs", json.dumps(chosen(run, "graphs")))


def test_a_failed_decode_capture_is_ended_and_eager_decoding_goes_on():
    """A capture that fails mid-way (a host sync inside it) leaves the thread on its own stream, no capture under
    way, and the pool's hold let go: a capture of the same pool after it works, and eager decoding of the same model
    goes on (its check falls back to eager with the reason)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=40)).to(CUDA).eval()
    stream = torch.cuda.current_stream()

    def syncing(body, args, warm):
        return cuda_graph()(lambda *a: body(*a) + body(*a).sum().item(), args, warm)

    step, used = build_step(choose_step(model, CUDA, False), model, torch.float32, 2, capture=lambda: syncing)
    assert step is None and used.kind == "eager" and "failed its check" in used.why
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    tokens, _ = decoded(model, torch.float32)
    graphed, _ = decoded(model, torch.float32, GraphStep(model, torch.float32, cuda_graph))
    assert graphed == tokens


def decoded(model: GPT, dtype: torch.dtype, step=None) -> tuple[list[list[int]], torch.Tensor]:
    """Two sequences decoded greedily together: their tokens and every step's logits."""
    decoder, logits = Decoder(model, 4, dtype, step), []
    inner = decoder.step_fn

    def recording(idx: torch.Tensor, state) -> torch.Tensor:
        out = inner(idx, state)
        logits.append(out[:2].clone())  # a graph's output is overwritten by its next replay
        return out

    decoder.step_fn = recording
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    seqs = [Sequence([1, 2, 3], greedy), Sequence([5] * 50, greedy), Sequence([7], greedy)]  # 3 rows: padded to 4
    for seq in seqs:
        decoder.join(seq)
    while not seqs[0].exhausted:
        decoder.step()
    return [seq.ids for seq in seqs[:2]], torch.stack(logits).float()


def test_the_cuda_graph_step_decodes_as_eager_and_is_chosen_on_the_gpu(record_property, monkeypatch):
    """The decode step replayed as CUDA graphs (rows padded, buckets crossed) against eager decoding of the same
    weights: in fp32 (TF32 off) the same greedy tokens and logits; in the GPU's autocast dtype, logits within
    COMPILED_DECODE_TOLERANCE; and the choice every command makes takes it, its check passed."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=256, vocab_size=80, pos_emb="rope",
                            norm="rmsnorm", mlp="swiglu", n_kv_head=2)).to(CUDA).eval()
    for dtype, bound in ((torch.float32, 1e-4), (autocast_dtype(CUDA, "auto"), COMPILED_DECODE_TOLERANCE)):
        step = GraphStep(model, dtype, cuda_graph)
        tokens, logits = decoded(model, dtype, step)
        eager_tokens, eager_logits = decoded(model, dtype)
        assert len(step.buckets) >= 2  # past 64 tokens: a second length bucket
        if dtype == torch.float32:
            assert tokens == eager_tokens
        assert close({0: 0.0}, {0: float((logits - eager_logits).abs().max())}, bound, record_property,
                     f"CUDA graphs against eager, {str(dtype).removeprefix('torch.')}")
    built, used = build_step(choose_step(model, CUDA, False), model, torch.float32, 4)
    assert isinstance(built, GraphStep) and used.kind == "cuda graphs", used


def test_size_auto_sizes_on_the_gpu_by_a_fit_measured_elsewhere(tmp_path, char_dataset):
    """The CPU twin: tests/test_sizing.py's size auto on a faked GPU. Here each size is timed on the GPU itself,
    the fit beside the preset made anywhere (its runs name no machine), and the run trains the size chosen."""
    from lmlab.api.training import train as train_api
    from lmlab.experiments.sizing import with_vocab
    from lmlab.model import build_model
    from tests.helpers import write_fit

    preset = write_config(tmp_path / "tiny.toml", char_dataset)
    with torch.device("meta"):
        params = build_model(with_vocab(load_config(preset)).model).num_params()
    write_fit(preset, char_dataset, params // 2)
    run = train_api(preset, run=tmp_path / "run", budget="30s", size="auto", device="cuda").path
    sizing = next(e for e in RunDir(run).events() if e["event"] == "sizing")
    assert sizing["speed"] == f"measured on {torch.cuda.get_device_name()}" and sizing["passes"] > 0
    assert RunDir(run).config().model.n_layer == sizing["depth"] and RunDir(run).events()[-1]["event"] == "end"


def test_the_cudnn_path_trains_as_torchs_pick_or_is_refused_by_the_timing(record_property):
    """The cudnn path's bf16 loss and head gradient beside the fused one's; where this GPU's cuDNN has no kernel for
    the shape, the timing leaves it out (lmlab.train.attention._timed; its faked twin is tests/test_attention.py's
    test_auto_on_cuda_times_cudnn_against_torchs_pick_and_takes_it_only_where_faster_by_the_gain)."""
    config = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=50304)
    x = torch.randint(0, 50257, (4, 256), device=CUDA)
    results = {}
    for path in ("fused", "cudnn"):
        torch.manual_seed(0)
        model = GPT(config).to(CUDA)
        model.use_attention(path)
        try:
            with torch.autocast("cuda", torch.bfloat16):
                _, loss = model(x, x.roll(-1, 1))
            loss.backward()
        except RuntimeError as refused:
            pytest.skip(f"this GPU's cuDNN refuses the shape: {refused}")
        grad = model.lm_head.weight.grad
        assert grad is not None
        results[path] = loss.item(), grad.float()
    gap = abs(results["fused"][0] - results["cudnn"][0])
    record_property("cudnn against fused, loss", gap)
    assert gap < BF16_TOLERANCE
    assert (results["fused"][1] - results["cudnn"][1]).norm() < 0.05 * results["fused"][1].norm()
