"""torchrun glue: one process per device, DDP or FSDP2 around the model, and the collectives the loop needs; without
torchrun a `Parallel` is a single process and every method is the identity, so the loop has one code path.

The batch rule: a config's optimizer step is `grad_accum_steps` micro-batches of `batch_size` sequences whatever the
world size; each rank runs `grad_accum_steps / world_size` of them, drawing the whole global batch from the same loader
RNG and keeping its own slice, so a run resumes on any number of processes in the same data order."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmlab.core.config import ModelConfig
from lmlab.core.device import resolve_device
from lmlab.core.errors import UserError, classify
from lmlab.data.loader import Batches
from lmlab.model import LanguageModel, build_model
from lmlab.run.checkpoint import load_checkpoint, model_tensors
from lmlab.train.fsdp import fill_from_main, gather_full_state, load_sharded, shard


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def elastic_restart() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


class Parallel:
    """This process's place in the job, and what the loop needs to train in step with the others."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.hosts = [socket.gethostname()] * world_size  # each rank's host name, gathered by `setup`
        self.timeout = 0.0  # train.collective_timeout, set by `setup`
        self.mode = "none"  # none | ddp | fsdp, set by build()
        self._model: Any = None  # the DDP wrapper or the sharded model (FSDPModule), for gradient sync
        self._flags: dist.ProcessGroup | None = None  # CPU group for stop flags
        self._vote: tuple[dist.Work, torch.Tensor] | None = None  # the flags vote under way (see `agree`)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_initialized()

    @property
    def local_world_size(self) -> int:
        """The job's processes on this host, which share its memory."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.world_size > 1 else 1

    def local_steps(self, grad_accum_steps: int) -> int:
        if grad_accum_steps % self.world_size:
            raise UserError(f"train.grad_accum_steps ({grad_accum_steps}) must be a multiple of the number of "
                            f"processes ({self.world_size}), as each runs an equal share of the micro-batches; "
                            f"set it to {self.world_size * -(-grad_accum_steps // self.world_size)} and lower "
                            "train.batch_size by as much to keep the tokens per step.")
        return grad_accum_steps // self.world_size

    def build(self, config: ModelConfig, parallel: str, device: torch.device, dtype: torch.dtype
              ) -> tuple[LanguageModel, torch.nn.Module | None]:
        """The model to train, freshly initialised on `device`, and the module that runs its forward where it is not
        the model itself (TrainStep's `wrapped`; None in one process): DDP around it or, per train.parallel, the model
        sharded in place by FSDP2, built sharded (`fsdp.fill_from_main`), so that no rank holds the whole model."""
        if not self.active:
            return build_model(config).to(device), None
        if parallel == "ddp":
            # Imported here, as FSDP, DDP and DTensor are slow to import, which a single process need not wait for.
            from torch.nn.parallel import DistributedDataParallel

            model = build_model(config).to(device)
            self._model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            if dtype == torch.float16:
                raise UserError('train.parallel = "fsdp" cannot use float16: its grad scaler would judge each '
                                'shard alone; set train.dtype to bfloat16 or float32, or train.parallel to "ddp".')
            with torch.device("meta"):
                model = build_model(config)
            # The fused AdamW built afterwards steps the DTensor shards as they are, found_inf skips included.
            self._model = shard(model)
            fill_from_main(model, config, device, self.is_main)
        self.mode = parallel
        return model, self._model

    def micro_batches(self, loader: Batches, grad_accum_steps: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of one optimizer step, each handed over while the caller runs forward and backward
        on it; gradients are synchronised on its last one only."""
        local = self.local_steps(grad_accum_steps)
        first = self.rank * local
        for i in range(grad_accum_steps):
            if not first <= i < first + local:
                loader.skip()  # another rank's: drawn but not built, so all loaders stay at the same position
            elif i == first + local - 1 or self.mode == "none":
                yield loader.next()
            elif self.mode == "ddp":
                with self._model.no_sync():
                    yield loader.next()
            else:  # FSDP2
                self._model.set_requires_gradient_sync(False)
                try:
                    yield loader.next()
                finally:
                    self._model.set_requires_gradient_sync(True)

    def reduce_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global mean loss and grad norm of a step, without a host sync, so every rank's spike guard and non-finite
        skip decide alike."""
        if self.mode == "fsdp":  # the norm is a DTensor, already reduced over the shards
            from torch.distributed.tensor import DTensor

            assert isinstance(grad_norm, DTensor)
            grad_norm = grad_norm.full_tensor()
        return self.all_reduce_sum(loss) / self.world_size, grad_norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (Gloo has no average); the tensor itself in one process."""
        if self.active:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """The mean over ranks of a few host numbers, so that every rank decides alike from measurements that differ a
        little from rank to rank."""
        if not self.active:
            return values
        total = self.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
        return (total / self.world_size).tolist()

    def from_main(self, value: int) -> int:
        """Rank 0's whole number on every rank: what rank 0 alone measured or chose."""
        if not self.active:
            return value
        tensor = torch.tensor([value])
        dist.broadcast(tensor, src=0, group=self._flags)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """Whether any rank raised `flag`, now: a blocking round trip, for a question asked once (at the end of a
        run)."""
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._flags)
        return bool(tensor.item())

    def agree(self, *values: float) -> tuple[float, ...]:
        """For each value, its largest over the ranks: whether any rank raised a flag (a stop signal, a failed write),
        so all leave the loop at the same step; the seconds a budget has spent, so all decide alike. Under torchrun, the
        answer to the previous call's values (`lag`): each call starts an all-reduce over a CPU group in the background
        and reads the one started a step before, so asking every step costs neither a device sync nor a round trip."""
        if not self.active:
            return values
        answer = (0.0,) * len(values)
        if self._vote is not None:
            work, votes = self._vote
            work.wait()
            answer = tuple(votes.tolist())
        votes = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._vote = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self._flags, async_op=True), votes
        return answer

    @property
    def lag(self) -> int:
        return int(self.active)

    def own_rng(self, seed: int, step: int) -> None:
        """Ranks other than 0 draw their own dropout masks from here on, seeded by (seed, rank, step); rank 0 keeps its
        stream, a single process's, as a checkpoint holds rank 0's generator state only."""
        if self.rank:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self, failed: bool = False) -> None:
        """Leave the job; after a failed collective (`failed`), without waiting for the vote under way."""
        if self.active:
            if self._vote is not None and not failed:
                self._vote[0].wait()  # every rank started it, so it ends
            dist.destroy_process_group()

    def where(self, rank: int) -> str:
        return f"rank {rank} on host {self.hosts[rank]}"

    def gather_text(self, text: str) -> list[str]:
        """Every rank's `text`, in rank order, on every rank (its UTF-8 bytes in tensors, no Python objects)."""
        if not self.active:
            return [text]
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)]), group=self._flags)
        longest = max(int(size) for size in sizes)
        chunks = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(chunks, torch.cat([data, torch.zeros(longest - len(data), dtype=torch.uint8)]),
                        group=self._flags)
        return [bytes(chunk[:int(size)].tolist()).decode() for chunk, size in zip(chunks, sizes)]

    def check_same(self, what: str, facts: dict[str, Any], fix: str) -> None:
        """Refuse, on every rank alike, a job whose ranks hold different `facts` (flat, JSON-able) about `what`: a rank
        trained on other inputs would change every step without saying so."""
        found = [json.loads(text) for text in self.gather_text(json.dumps(facts, sort_keys=True))]
        for rank, theirs in enumerate(found):
            if theirs != found[0]:
                keys = sorted(set(found[0]) | set(theirs), key=str)
                differ = ", ".join(f"{k} {found[0].get(k)} -> {theirs.get(k)}" for k in keys
                                   if found[0].get(k) != theirs.get(k))
                raise UserError(f"{self.where(rank)} was started with another {what} than {self.where(0)} "
                                f"({differ}); {fix}.")

    def lost(self, err: BaseException) -> str | None:
        """Who a failed collective lost and how, said from this rank, or None when `err` is not a collective's
        failure."""
        failed = classify(err)
        if not self.active or failed not in ("peer", "timeout"):
            return None
        others = [r for r in range(self.world_size) if r != self.rank]
        if failed == "timeout":
            how = (f"waited {self.timeout:g} s (train.collective_timeout) for an answer: the network between the hosts "
                   "is down or a process is stuck")
        else:
            # Gloo names the address of the peer whose connection closed: a rank of the host that has it.
            address = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", str(err))
            there = address and [r for r in others if _address(self.hosts[r]) == address.group(1)]
            others = there or others
            how = "its connection closed: the process died or its host went down"
        peers = ", ".join(self.where(r) for r in others[:3]) + (f" and {len(others) - 3} more" if others[3:] else "")
        return f"{self.where(self.rank)} lost {peers} ({how})"


    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Whole weights and optimizer state_dict for checkpoint.save_checkpoint, on rank 0 (empty elsewhere);
        gathered from the shards under FSDP, which every rank must call together."""
        if self.mode == "fsdp":
            return gather_full_state(model, optimizer, self.is_main)
        return (model_tensors(model), optimizer.state_dict()) if self.is_main else ({}, {})

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                        ) -> dict[str, Any]:
        """checkpoint.load_checkpoint, sharding whole tensors under FSDP: any checkpoint loads on any world size."""
        if self.mode == "fsdp":
            return load_sharded(folder, model, optimizer)
        return load_checkpoint(folder, model, optimizer)


def from_env() -> Parallel:
    """This process's place in the torchrun job, before joining it, so that what the world size decides is refused
    before the processes connect."""
    if not launched_by_torchrun():
        return Parallel()
    return Parallel(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def _address(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def setup(device_name: str, timeout: float) -> tuple[Parallel, torch.device]:
    """Join the torchrun job if there is one (NCCL on CUDA, Gloo on the CPU), a collective failing after `timeout`
    seconds without an answer, and return this process's place in it and its device."""
    device = resolve_device(device_name)
    parallel = from_env()
    if not launched_by_torchrun():
        return parallel, device
    if device.type == "mps":
        raise UserError("torchrun is not supported on MPS; use --device cpu.")
    if device.type == "cuda":
        device = torch.device("cuda", cuda_index(parallel.local_rank, parallel.local_world_size,
                                                 torch.cuda.device_count()))
        torch.cuda.set_device(device)
        # NCCL's own timeout is longer than the collectives' `timeout`, so that the loop's Gloo vote fails first and
        # the job ends with the sentence naming the host it lost, not NCCL's watchdog abort; twice the timeout and a
        # minute more, as a step under way when the peer went may have started a timeout earlier.
        dist.init_process_group("nccl", timeout=timedelta(seconds=2 * timeout + 60), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    # its own, so its votes run beside the rest
    parallel._flags = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    parallel.timeout = timeout
    parallel.hosts = parallel.gather_text(socket.gethostname())
    return parallel, device


def cuda_index(local_rank: int, local_world: int, visible: int) -> int:
    """The GPU of this process among the `visible` ones: its local rank when every process on the node sees all
    of them, 0 when each sees only its own (SLURM's --gpus-per-task, a CUDA_VISIBLE_DEVICES per rank)."""
    if visible >= local_world:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(f"{local_world} processes on this node share {visible} visible GPUs, and NCCL needs one GPU per "
                    f"process; start torchrun with --nproc_per_node={visible}.")
