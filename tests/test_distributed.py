"""Training under torchrun on the CPU (Gloo): real `torch.distributed.run` jobs of two processes against the
same run in one process, resume across world sizes, and a worker that dies; FSDP built on the meta device and its
bf16 precision against one process's autocast; NCCL's timeout against the vote's."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lmlab.core.config import ModelConfig
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from lmlab.train.distributed import Parallel, setup
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import (
    LMLAB,
    TOLERANCE,
    assert_same,
    finish,
    install_plugin,
    losses,
    output,
    torchrun,
    val_losses,
    write_config,
    writer_pid,
)

# A fixed LR schedule (lr_decay_iters), so runs of different lengths take the same first steps; two micro-batches
# per step, one per rank under two processes.
SETTINGS = ["train.grad_accum_steps=2", "train.lr_decay_iters=20", "train.log_interval=1", "train.keep_checkpoints=9"]


def resumable_at(run: Path, step: int, copy: Path) -> Path:
    """A copy of `run` as if it had stopped after `step`: `latest` points at that checkpoint."""
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    return copy


@pytest.fixture(scope="session")
def config(tmp_path_factory, char_dataset) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "tiny.toml", char_dataset, max_iters=20)


@pytest.fixture(scope="session")
def single(tmp_path_factory, config) -> Path:
    """The reference: 60 steps in one process, without torchrun."""
    run = tmp_path_factory.mktemp("single") / "run"
    Trainer(train_job(load_config(config, [*SETTINGS, "train.max_iters=60"]), run, "cpu")).run()
    return run


def sets(*settings: str) -> list[str]:
    return [arg for s in [*SETTINGS, *settings] for arg in ("--set", s)]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_and_resumes_on_either(tmp_path, config, single):
    run = tmp_path / "fsdp"
    finish(torchrun([str(config), "--run", str(run), *sets('train.parallel="fsdp"')]))
    assert_same(losses(run), losses(single), range(1, 21))
    assert max(abs(v - val_losses(single)[s]) for s, v in val_losses(run).items()) < TOLERANCE
    assert next(e for e in RunDir(run).events() if e["event"] == "start")["world_size"] == 2
    # The gathered checkpoint continues in one process ...
    on_one = resumable_at(run, 10, tmp_path / "fsdp-then-one")
    Trainer(train_job(load_config(on_one / "config.toml"), on_one, "cpu", resume=True)).run()
    assert_same(losses(on_one), losses(single), range(1, 21))
    # ... and a one-process checkpoint continues sharded over two.
    on_two = resumable_at(single, 10, tmp_path / "one-then-fsdp")
    finish(torchrun(["--resume", str(on_two), *sets('train.parallel="fsdp"', "train.max_iters=20")]))
    assert_same(losses(on_two), losses(single), range(1, 21))


@pytest.mark.slow
def test_fsdp_in_bf16_gathers_bf16_and_checkpoints_fp32_weights(tmp_path, config):
    """The mixed-precision policy on a real two-process job: the matmul weights are all-gathered in bf16 and the
    gradients reduced in fp32; it trains like one bf16 process, and the checkpoint holds the fp32 master weights."""
    alone = tmp_path / "alone"
    Trainer(train_job(load_config(config, [*SETTINGS, "train.dtype=bfloat16"]), alone, "cpu")).run()
    run = tmp_path / "fsdp-bf16"
    finish(torchrun([str(config), "--run", str(run), *sets('train.parallel="fsdp"', "train.dtype=bfloat16")]))
    # The same bf16 values as autocast's (one process: bitwise, test below); the ranks' gradient sums differ in order
    # alone: measured 1.2e-4 apart over these 20 steps (5e-4 when FSDP cast whole blocks, norms and residual too)
    assert max(abs(losses(run)[s] - losses(alone)[s]) for s in range(1, 21)) < 1e-3
    assert RunDir(run).events()[0]["dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in RunDir(run).load("latest", "cpu").model.parameters())


def wait_for(job: subprocess.Popen, predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job.poll() is not None or time.monotonic() > deadline:
            job.terminate()
            pytest.fail(f"the job ended or stalled first:\n{output(job)}")
        time.sleep(0.05)


@pytest.mark.slow
def test_ddp_matches_one_process_through_an_elastic_restart(tmp_path, config, single):
    """Rank 0 is killed after the first checkpoint; torchrun --max-restarts starts the same command again, which
    continues from the checkpoint: the loss curve is the one-process curve, step for step."""
    run = tmp_path / "ddp"
    # Without it, a restarted worker can read its peers' addresses from the failed attempt (pytorch#135712).
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = torchrun([str(config), "--run", str(run), *sets("train.max_iters=60")], "--max-restarts=1", env=env)
    wait_for(job, lambda: (run / "checkpoints" / "step_000010").exists() and writer_pid(run))
    os.kill(writer_pid(run), signal.SIGKILL)
    out = finish(job)
    assert "Resumed" in out
    assert_same(losses(run), losses(single), range(1, 61))
    assert [e["event"] for e in RunDir(run).events()].count("start") == 1


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_an_error(tmp_path, config):
    run = tmp_path / "dies"
    job = torchrun([str(config), "--run", str(run), *sets("train.max_iters=5000")])
    wait_for(job, lambda: any(e["event"] == "train" for e in RunDir(run).events()))
    pid = writer_pid(run)
    os.kill(pid, signal.SIGKILL)
    out = output(job)
    assert job.returncode != 0
    assert "ChildFailedError" in out and f"Signal 9 (SIGKILL) received by PID {pid}" in out


def test_accumulation_that_cannot_split_over_the_ranks_is_refused():
    with pytest.raises(UserError, match=r"grad_accum_steps \(3\) must be a multiple of the number of processes \(2\)"):
        Parallel(rank=1, local_rank=1, world_size=2).local_steps(3)


@pytest.mark.slow
def test_a_rank_whose_peer_died_ends_with_one_line(tmp_path, config):
    """Two ranks started with torchrun's environment but no launcher, so none stops the survivor first: rank 0 is
    killed while both train, and rank 1, in a collective with it, says why it stops in one line (it printed a
    traceback from `barrier()`)."""
    with socket.socket() as s:  # a free port for the job's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    job = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([LMLAB, "train", str(config), "--run", str(run), *sets("train.max_iters=100000"),
                               "--device", "cpu"], env={**job, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        wait_for(ranks[0], lambda: any(e["event"] == "train" for e in RunDir(run).events()))
        ranks[0].kill()
        ranks[0].wait()
        err = ranks[1].communicate(timeout=120)[1]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    lines = err.strip().splitlines()
    assert ranks[1].returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: rank 1 on host ") and " lost rank 0 on host " in lines[0], err
    assert f"lmlab train --resume {run}" in lines[0] or "run the same command on each again" in lines[0], err


@pytest.fixture
def one_process_job(tmp_path):
    """A real Gloo job of one process, joined for the test and left after it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Parallel(0, 0, 1)
    dist.destroy_process_group()


MODERN = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, pos_emb="rope", norm="rmsnorm",
                     mlp="swiglu", qk_norm=True, bias=False)


def test_fsdp_builds_on_the_meta_device_then_takes_the_initial_weights_one_process_would(one_process_job):
    torch.manual_seed(3)
    alone = build_model(MODERN)
    torch.manual_seed(3)
    model, wrapped = one_process_job.build(MODERN, "fsdp", torch.device("cpu"), torch.float32)
    assert wrapped is model and all(isinstance(p, DTensor) for p in model.parameters())  # sharded in place
    for (name, mine), theirs in zip(model.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(mine.full_tensor(), theirs), name
    assert torch.equal(model.rotary.cos, alone.rotary.cos)  # a buffer no state dict holds, rank 0's
    assert torch.equal(torch.rand(3), (torch.manual_seed(3), build_model(MODERN), torch.rand(3))[2])  # same RNG after


def test_one_process_runs_the_model_itself_which_the_steps_graphs_rule_reads_as_alone():
    # Built as (model, model), a lone GPU run's compiled step was denied CUDA graphs "under torchrun" (the H200).
    for parallel in ("ddp", "fsdp"):
        model, wrapped = Parallel().build(MODERN, parallel, torch.device("cpu"), torch.float32)
        assert wrapped is None and not any(isinstance(p, DTensor) for p in model.parameters())


@pytest.mark.parametrize("config", [MODERN, dataclasses.replace(MODERN, vocab_size=1100),  # a head padded to 1152
                                    # biases
                                    ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40)],
                         ids=["modern", "padded head", "GPT-2"])
def test_fsdp_in_bf16_computes_what_one_process_computes_under_autocast(one_process_job, config):
    """And no module FSDP wraps (the model, its matmul layers) returns a view: pyproject.toml makes FSDP's warning of
    one an error."""
    torch.manual_seed(0)
    model, wrapped = one_process_job.build(config, "fsdp", torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(0)
    alone = build_model(config)
    x = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.autocast("cpu", torch.bfloat16):
        loss = wrapped(x, x)[1]
        alone_loss = alone(x, x)[1]
    loss.backward()
    alone_loss.backward()
    assert torch.equal(loss, alone_loss)  # bf16 matmuls, fp32 norms, embeddings and residual stream in both
    for (name, p), q in zip(model.named_parameters(), alone.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p.grad.full_tensor(), q.grad), name


def test_nccls_own_timeout_outlasts_the_collectives_so_the_vote_says_who_was_lost(fake_gpu, monkeypatch):
    timeouts = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout, **kw: timeouts.update({backend: timeout}))
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: timeouts.update({f"{backend} votes": timeout}))
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    parallel, device = setup("cuda", 120)
    assert device == torch.device("cuda", 0) and parallel.timeout == 120
    assert timeouts["gloo votes"].total_seconds() == 120 and timeouts["nccl"].total_seconds() == 300


RANK_BUILDS = """
import sys
from pathlib import Path

import torch
from lmlab.core.config import ModelConfig
from lmlab.model import build_model
from lmlab.train.distributed import setup

config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, pos_emb="rope")
parallel, device = setup("cpu", 60)
torch.manual_seed(3)
model, _ = parallel.build(config, "fsdp", device, torch.float32)
torch.manual_seed(3)
alone = build_model(config)
same = all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), alone.parameters()))
local = sum(p.to_local().numel() for p in model.parameters())
Path(sys.argv[1], f"rank{parallel.rank}.txt").write_text(
    f"same {same}, buffers {torch.equal(model.rotary.sin, alone.rotary.sin)}, "
    f"holds {local} of {sum(q.numel() for q in alone.parameters())}")
parallel.close()
"""


@pytest.mark.slow
def test_every_fsdp_rank_starts_from_the_weights_one_process_builds(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(RANK_BUILDS)
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    # each rank's own file: two processes printing to one pipe can run their lines together
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert [line.split(", holds")[0] for line in lines] == ["same True, buffers True"] * 2
    for line in lines:
        held, whole = map(int, line.split("holds ")[1].split(" of "))
        assert held < 0.6 * whole  # each rank allocates about half of the weights


# Each rank trains six steps of a sharded model compiled block by block, by Dynamo alone (backend "eager": the graphs
# Dynamo captures and where it breaks them, without the code generator's minutes on a CPU), and writes its counters
# after each step.
COMPILED_STEPS = """
import functools
import json
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

torch.compile = functools.partial(torch.compile, backend="eager")
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.core.machine import Machine
from lmlab.core.threads import ThreadChooser
from lmlab.train.distributed import setup
from lmlab.train.step import TrainStep

config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, pos_emb="rope", mlp="swiglu")
parallel, device = setup("cpu", 60)
dtype = getattr(torch, sys.argv[2])
model, wrapped = parallel.build(config, "fsdp", device, dtype)
machine = Machine(device, dtype, ThreadChooser(torch.get_num_threads(), "train.threads"))
step = TrainStep(model, TrainConfig(batch_size=2, compile=True, parallel="fsdp", attention="fused"), machine, wrapped,
                 parallel.reduce_step, processes=parallel.world_size)
x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(parallel.rank))
seen = []
for _ in range(6):
    step([(x, x)], 1, 1e-3)
    seen.append({"breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
                 "frames": counters["frames"]["total"]})
Path(sys.argv[1], f"rank{parallel.rank}.json").write_text(json.dumps(seen))
parallel.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_shards_blocks_compiled_whole_with_no_graph_break_and_no_new_graph_after_step_2(tmp_path, dtype):
    """Compiled whole, a sharded model broke at the hook FSDP2 put on each block (and in bf16 on each matmul layer),
    about 9 graphs a block; each block compiled on its own and sharded whole is one graph that every block reuses."""
    script = tmp_path / "steps.py"
    script.write_text(COMPILED_STEPS)
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path), dtype], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # from the first step on: one frame compiled, into one graph both blocks replay, never broken
        assert seen == [{"breaks": 0, "graphs": 1, "frames": 1}] * 6, seen


# A model plugin that notes, in a file beside it, each rank's builds and the device each was built on.
RECORDING_MODEL = """
import os
from pathlib import Path

import torch
import torch.nn as nn
from lmlab.model import LanguageModel
from lmlab.model.loss import next_token_loss


class Tiny(LanguageModel):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)
        with open(Path(__file__).with_name("builds.txt"), "a") as builds:
            builds.write(f"rank {os.environ.get('RANK')}: {self.head.weight.device.type}\\n")

    def forward(self, idx, targets=None, cache=None):
        logits = self.head(self.wte(idx))
        return logits, None if targets is None else next_token_loss(logits, targets)
"""


@pytest.mark.slow
def test_fsdp_training_builds_the_model_whole_on_no_rank_but_rank_0s_host_copy(tmp_path, config):
    """FSDP built the full model on every rank's device before sharding it, so a model larger than one GPU could not
    be FSDP-trained. Now each rank builds a shape on the meta device and holds its shards alone; rank 0 builds the
    initial weights once, in host memory."""
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "recording", "lmlab-recording", RECORDING_MODEL)
    recipe = tmp_path / "recording.toml"
    recipe.write_text(config.read_text().replace("[model]\n", '[model]\nkind = "recording"\n'))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    finish(torchrun([str(recipe), "--run", str(tmp_path / "run"), *sets('train.parallel="fsdp"',
                                                                        "train.max_iters=2")], env=env))
    builds = set((site / "builds.txt").read_text().splitlines())
    assert "rank 1: cpu" not in builds and "rank 1: meta" in builds, builds
    assert "rank 0: cpu" in builds  # the initial weights, given to every rank's shards


# Each rank: one step, a checkpoint of it, a second step; the checkpoint loaded into the optimizer that took both,
# then into a fresh one, each followed by the second step again. An odd vocabulary shards the embedding unevenly.
RANK_LOADS = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from lmlab.core.config import ModelConfig, TrainConfig
from lmlab.run.checkpoint import save_checkpoint
from lmlab.train.distributed import setup
from lmlab.train.optim import OPTIMIZERS

config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=41)
parallel, device = setup("cpu", 60)
torch.manual_seed(0)
model, wrapped = parallel.build(config, "fsdp", device, torch.float32)
batches = [torch.randint(0, 41, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def step(optimizer, x):
    wrapped(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def held(optimizer):
    return {(i, k): v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def as_saved(optimizer, saved):
    whole = {key: v.full_tensor() if hasattr(v, "full_tensor") else v for key, v in held(optimizer).items()}
    return sorted(whole) == sorted(saved) and all(torch.equal(whole[key], saved[key]) for key in saved)


def second_step_as_before(optimizer):
    step(optimizer, batches[1])
    return all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), after))


optimizer = OPTIMIZERS["adamw"].build(model, TrainConfig(), device)
step(optimizer, batches[0])
folder = Path(sys.argv[1], "step_000001")
weights, state = parallel.full_state(model, optimizer)
if parallel.is_main:
    save_checkpoint(folder.parent, 1, weights, state, {}, best=False)
parallel.barrier()
saved = {tuple(int(p) if p.isdigit() else p for p in name.split(".", 1)): t
         for name, t in load_file(folder / "optimizer.safetensors").items()}
step(optimizer, batches[1])
after = [p.full_tensor() for p in model.parameters()]
places = {key: v.to_local().data_ptr() if hasattr(v, "to_local") else v.data_ptr()
          for key, v in held(optimizer).items()}
parallel.load_checkpoint(folder, model, optimizer)
kept = places == {key: v.to_local().data_ptr() if hasattr(v, "to_local") else v.data_ptr()
                  for key, v in held(optimizer).items()}
lines = [f"kept {kept}", f"loaded {as_saved(optimizer, saved)}", f"continues {second_step_as_before(optimizer)}"]
fresh = OPTIMIZERS["adamw"].build(model, TrainConfig(), device)
parallel.load_checkpoint(folder, model, fresh)
lines += [f"fresh loaded {as_saved(fresh, saved)}", f"fresh continues {second_step_as_before(fresh)}"]
Path(sys.argv[1], f"rank{parallel.rank}.txt").write_text(", ".join(lines))
parallel.close()
"""


@pytest.mark.slow
def test_fsdp_loads_each_ranks_slice_of_the_optimizer_state_into_the_shards_it_holds(tmp_path):
    """A rollback's load copies each rank's slice of the saved state into the shards the optimizer holds (torch's
    set_optimizer_state_dict made new ones beside them: the state twice on the device), a resume's first load makes
    them once; either way the state is the checkpoint's and the next step is the one taken before, bit for bit."""
    script = tmp_path / "load.py"
    script.write_text(RANK_LOADS)
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    expected = "kept True, loaded True, continues True, fresh loaded True, fresh continues True"
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == [expected] * 2
