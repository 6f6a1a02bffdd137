"""torchrun glue: one process per device, DDP or FSDP2 around the model, and the collectives the loop needs.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; without them a `Parallel`
is a single process and every method here is the identity, so the training loop has one code path.

The batch rule: a config's optimizer step is `grad_accum_steps` micro-batches of `batch_size` sequences
whatever the world size. Each rank runs `grad_accum_steps / world_size` of them, so a rank holds the
micro-batch the config sized for one device, and every rank draws the whole global batch from the same
loader RNG and keeps its own disjoint slice: the loader's position does not depend on the world size, and a
run resumes on any number of processes in the same data order.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lmlab.checkpoint import (
    load_checkpoint,
    load_state,
    model_tensors,
    read_optimizer_state,
    tied_aliases,
)
from lmlab.data.loader import BatchLoader
from lmlab.device import resolve_device
from lmlab.errors import UserError
from lmlab.model import LanguageModel

# A collective that waits longer than this fails instead of hanging: a peer that is alive but stuck (a dead one
# is noticed by torchrun within seconds). Generous, because every rank waits while rank 0 writes a checkpoint.
TIMEOUT = timedelta(minutes=10)

# Whole tensors on rank 0's CPU: the same files a single-device run writes, at the cost of rank 0's host memory.
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

# Our GPT returns its logits as a slice of the padded head's output; nothing modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def elastic_restart() -> bool:
    """True in workers that `torchrun --max-restarts` started again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


class Parallel:
    """This process's place in the job, and what the loop needs to train in step with the others."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.mode = "none"  # none | ddp | fsdp, set by wrap()
        self._model: torch.nn.Module | None = None  # the DDP wrapper or the sharded model, for gradient sync
        self._flags: dist.ProcessGroup | None = None  # CPU group for stop flags

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_initialized()

    def local_steps(self, grad_accum_steps: int) -> int:
        """Micro-batches each rank runs per optimizer step (the batch rule in the module docstring)."""
        if grad_accum_steps % self.world_size:
            raise UserError(f"train.grad_accum_steps ({grad_accum_steps}) must be a multiple of the number of "
                            f"processes ({self.world_size}), as each runs an equal share of the micro-batches; "
                            f"set it to {self.world_size * -(-grad_accum_steps // self.world_size)} and lower "
                            "train.batch_size by as much to keep the tokens per step.")
        return grad_accum_steps // self.world_size

    def wrap(self, model: LanguageModel, parallel: str, dtype: torch.dtype) -> torch.nn.Module:
        """The module to train: the model itself in one process, else DDP around it or the model sharded in place
        by FSDP2 (each of its `shard_units`, then the rest), per train.parallel."""
        if not self.active:
            return model
        if parallel == "ddp":
            device = next(model.parameters()).device
            self._model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            if dtype == torch.float16:
                raise UserError('train.parallel = "fsdp" cannot use float16: its grad scaler would judge each '
                                'shard alone; set train.dtype to bfloat16 or float32, or train.parallel to "ddp".')
            # Parameters stay fp32 and autocast casts them, as in one process, so FSDP computes the same numbers
            # (at the price of fp32 all-gathers). The fused AdamW built afterwards steps the DTensor shards as
            # they are, found_inf skips included (checked on CPU/Gloo), so no fallback optimizer is needed.
            for unit in model.shard_units():
                fully_shard(unit)
            self._model = fully_shard(model)
        self.mode = parallel
        return self._model

    def micro_batches(self, loader: BatchLoader, grad_accum_steps: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of one optimizer step; gradients are synchronised on its last one only."""
        local = self.local_steps(grad_accum_steps)
        first = self.rank * local
        for i in range(grad_accum_steps):
            batch = loader.next()  # drawn by every rank, so all loaders stay at the same position
            if not first <= i < first + local:
                continue
            if i == first + local - 1:
                yield batch
            else:
                with self._no_sync():  # held while the caller runs forward and backward on the batch
                    yield batch

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        if self.mode == "ddp":
            with self._model.no_sync():
                yield
        elif self.mode == "fsdp":
            self._model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self._model.set_requires_gradient_sync(True)
        else:
            yield

    def reduce_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global mean loss and grad norm of a step, as plain device tensors and without a host sync, so
        every rank's spike guard and non-finite skip decide alike."""
        if isinstance(grad_norm, DTensor):  # FSDP's norm is already reduced over the shards
            grad_norm = grad_norm.full_tensor()
        return self.all_reduce_sum(loss) / self.world_size, grad_norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (Gloo has no average); the tensor itself in one process."""
        if self.active:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes, e.g. caught a stop signal: all ranks must leave the loop at the same step.
        Goes through a CPU group, so asking every step costs no device sync."""
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._flags)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active:
            dist.destroy_process_group()

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Whole weights and optimizer state_dict for checkpoint.save_checkpoint, on rank 0 (empty elsewhere);
        gathered from the shards under FSDP, which every rank must call together."""
        if self.mode != "fsdp":
            return (model_tensors(model), optimizer.state_dict()) if self.is_main else ({}, {})
        weights = get_model_state_dict(model, options=_FULL)
        by_name = get_optimizer_state_dict(model, optimizer, options=_FULL)
        if not self.is_main:
            return {}, {}
        aliases = tied_aliases(model)
        index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
        return ({name: t for name, t in weights.items() if name not in aliases},
                {"state": {index[name]: v for name, v in by_name["state"].items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]})

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                        ) -> dict[str, Any]:
        """checkpoint.load_checkpoint, sharding whole tensors under FSDP: any checkpoint loads on any world size."""
        if self.mode != "fsdp":
            return load_checkpoint(folder, model, optimizer)
        state = load_state(folder)
        weights = load_file(str(folder / "model.safetensors"))
        weights.update({alias: weights[kept] for alias, kept in tied_aliases(model).items()})
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        if optimizer is not None:
            names = _param_names(model, optimizer)
            saved = read_optimizer_state(folder, state)
            by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in saved["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
        return state


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order an optimizer state_dict numbers them (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def from_env() -> Parallel:
    """This process's place in the torchrun job (one process without torchrun), before joining it: what can be
    checked against the world size is refused before the processes connect."""
    if not launched_by_torchrun():
        return Parallel()
    return Parallel(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def setup(device_name: str) -> tuple[Parallel, torch.device]:
    """Join the torchrun job if there is one (NCCL on CUDA, one GPU per local rank; Gloo on the CPU) and return
    this process's place in it and its device."""
    device = resolve_device(device_name)
    parallel = from_env()
    if not launched_by_torchrun():
        return parallel, device
    if device.type == "mps":
        raise UserError("torchrun is not supported on MPS; use --device cpu.")
    if device.type == "cuda":
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        parallel._flags = dist.new_group(backend="gloo", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return parallel, device
