"""FSDP2 for `Parallel`: the model sharded to compute what one process computes under autocast, rank 0's initial weights
given to every rank's shards, and checkpoints gathered whole and loaded back into shards (any checkpoint loads on any
world size). torch's FSDP modules are imported inside the functions: a single process never loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lmlab.core.config import ModelConfig
from lmlab.model import LanguageModel, build_model
from lmlab.run.checkpoint import copy_into, into_place, load_state, read_optimizer_state, tied_aliases


def fill_from_main(model: torch.nn.Module, config: ModelConfig, device: torch.device, is_main: bool) -> None:
    """Allocate the shards of `model` (sharded on the meta device) on `device` and give every rank rank 0's initial
    weights, built on rank 0's CPU as one process builds them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    whole = build_model(config) if is_main else None  # on rank 0's CPU: host memory, not the GPU's
    set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded, and those a model recomputes rather than saves (rotary tables) are in no state
    # dict: rank 0's, to every rank.
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if whole is not None:
                buffer.copy_(whole.get_buffer(name))
            dist.broadcast(buffer, src=0)


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, is_main: bool
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole weights and optimizer state_dict gathered from the shards, on rank 0's CPU (empty elsewhere). Every rank
    must call it together."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # torch types a state dict by every kind of value one may hold; whole, a model's holds tensors, and an optimizer's
    # {"state": {name: {...}}, "param_groups": [{"params": [name, ...], ...}]}
    weights = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=full))
    by_name = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer, options=full))
    if not is_main:
        return {}, {}
    aliases = tied_aliases(model)
    names = {id(p): name for name, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return ({name: t for name, t in weights.items() if name not in aliases},
            {"state": {index[name]: v for name, v in by_name["state"].items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]})


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """checkpoint.load_checkpoint into a sharded model. The optimizer state is read into host memory and each rank
    copies its slice of each tensor into the shard it holds (`into_shard`): torch's set_optimizer_state_dict would
    hold the state twice over on the device while it loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load_state(folder)
    weights = load_file(str(folder / "model.safetensors"))
    aliases = {alias: weights[kept] for alias, kept in tied_aliases(model).items()}
    set_model_state_dict(model, {**weights, **aliases}, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None:
        optimizer.load_state_dict(into_place(optimizer, read_optimizer_state(folder, state), into_shard))
    return state


def into_shard(param: torch.Tensor, mine: torch.Tensor | None, whole: torch.Tensor) -> torch.Tensor | None:
    """The placer (checkpoint.Placer) of a sharded optimizer: this rank's slice of `whole`, copied into the shard the
    optimizer holds for it (made first where it holds none yet), so the device never holds a whole tensor. Other tensors
    (a step count) as one process places them."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not (isinstance(param, DTensor) and whole.shape == param.shape):
        return copy_into(param, mine, whole)
    shard = mine if isinstance(mine, DTensor) else torch.empty_like(param)
    assert isinstance(shard, DTensor), "empty_like keeps a DTensor's sharding"
    shape, offset = compute_local_shape_and_global_offset(whole.shape, shard.device_mesh, shard.placements)
    shard.to_local().copy_(whole[tuple(slice(start, start + size) for start, size in zip(offset, shape))])
    return shard


def shard(model: LanguageModel) -> LanguageModel:
    """Shard `model` in place with FSDP2: each of its `shard_units` whole (a block's shards gathered by one hook before
    it, outside its compiled forward: lmlab.train.compiled), then the rest with the root. Gathered in fp32 whatever the
    autocast dtype, so it computes what one process computes under autocast, which casts as it casts a single
    process's: a bf16 policy would also round the norms' gains, which autocast keeps in fp32, and one per matmul layer
    (what keeps them apart) puts a hook, and so a graph break, around each of a compiled block's matmuls."""
    from torch.distributed.fsdp import fully_shard

    for unit in model.shard_units():
        fully_shard(unit)
    model.register_forward_hook(_own_outputs)  # before FSDP's own, which it hands the outputs to
    fully_shard(model)  # in place: the model's class becomes FSDP's subclass of it
    return model


def _own_outputs(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """The root's outputs, each a tensor of its own: FSDP's root hooks its pre-backward on what forward returns, and
    an in-place op on a view (the logits cut from a padded head's) would drop that hook. Copied under FSDP alone, so
    one process trains on its view at no cost."""
    def own(t: Any) -> Any:
        return t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t
    return tuple(own(t) for t in output) if isinstance(output, tuple) else own(output)
