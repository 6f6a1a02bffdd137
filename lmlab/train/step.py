"""The one training step: the training loop, fine-tuning and `lmlab bench` all run this code."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from lmlab.core.config import TrainConfig
from lmlab.core.device import autocast
from lmlab.core.machine import Machine
from lmlab.model import LanguageModel
from lmlab.model.plugins import backward_named, check_loss
from lmlab.train.attention import choose_attention
from lmlab.train.compiled import GRAPHS, CompiledBlocks
from lmlab.train.optim import optimizer_of

Batch = tuple[torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainStep:
    """The optimizer, the fp16 grad scaler and the (maybe compiled, maybe wrapped) forward of one model, and the step
    that uses them: forward and backward over the micro-batches, unscale, clip, skip the update if the loss or the
    gradient is not finite, update, zero the gradients.

    `machine` decides by its rules (lmlab.core.machine) whether the model is compiled (block by block:
    lmlab.train.compiled), whether its blocks replay as CUDA graphs, and its attention path, `processes` sharing the
    host's memory, `cfg.attention` set by `attention_setting` and rank 0's path every rank's (`agree`). `wrapped` is
    what runs forward when it is not the model itself (DDP, FSDP); `reduce` makes the loss and gradient norm global
    under torchrun, so every rank skips alike. `note` is a line for the user when `compile = "auto"` could not
    compile here."""

    def __init__(self, model: LanguageModel, cfg: TrainConfig, machine: Machine, wrapped: torch.nn.Module | None = None,
                 reduce: Reduce | None = None, agree: Callable[[int], int] | None = None, processes: int = 1,
                 attention_setting: str = "train.attention"):
        self.model, self.machine, self.grad_clip, self.reduce = model, machine, cfg.grad_clip, reduce
        self.device, self.dtype = machine.device, machine.dtype
        compiled, self.note = machine.compiles(cfg.compile)
        tokens = cfg.batch_size * cfg.grad_accum_steps * model.config.block_size
        graphs = machine.graphs(compiled, wrapped is None, cfg.grad_accum_steps, model.flops_per_token() * tokens,
                                model.graphs)
        if compiled:
            # One compiled model at a time per process: sweeps, bench and the GPU report build many, and past
            # Dynamo's recompile limit (8 per function) it would silently run the next ones eager.
            torch.compiler.reset()
        # What runs forward in training and in evaluations: the model (its blocks compiled in place) or its wrapper.
        self.forward = self.scoring = wrapped or model
        self.blocks = CompiledBlocks(model, self.device, GRAPHS if graphs else "default") if compiled else None
        chosen = optimizer_of(cfg)
        self.optimizer = chosen.build(model, cfg, self.device)
        self.attention_path = choose_attention(model, cfg, machine, chosen.state_bytes, processes, agree,
                                               attention_setting)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def eager_step(self, batches: Iterable[Batch], n_batches: int, lr: float) -> None:
        """A step of the eager model: what a budget's timing takes (in `untouched`), leaving the compile to the run's
        first step."""
        with nullcontext() if self.blocks is None else self.blocks.eager():
            self(batches, n_batches, lr)

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Steps inside leave no trace: the weights, the optimizer's state, the grad scaler and the generators are
        restored after them, so a run timed on its own step computes the bits it would have untimed."""
        weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        optimizer, scaler = copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scaler.state_dict())
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):  # its generators
            try:
                yield
            finally:
                self.model.load_state_dict(weights)
                self.optimizer.load_state_dict(optimizer)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler.is_enabled():
                    self.scaler.load_state_dict(scaler)

    def restore_attention(self, path: str | None) -> None:
        """A resumed run goes on by the attention path it trained by, whatever the rule says now; a checkpoint without
        one (older than the choice) by the one chosen now."""
        if path is not None and self.attention_path is not None:
            self.model.use_attention(path)
            self.attention_path = path
            self.machine.said("attention", f"attention {path}", "as this run trained, its checkpoint says")

    @property
    def compiled(self) -> bool:
        return self.blocks is not None and self.blocks.mode is not None

    def __call__(self, batches: Iterable[Batch], n_batches: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at `lr` over `n_batches` micro-batches; returns (mean loss, gradient norm) as device
        tensors, without a host sync, so the caller decides when to read them."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.blocks is not None and self.blocks.mode == GRAPHS:
            # CUDA graphs' outputs of the step before may be overwritten from here (cudagraph trees' rule; the loop
            # keeps only the loss and gradient norm, which are computed outside the blocks).
            torch.compiler.cudagraph_mark_step_begin()
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            check_loss(self.model, loss, x.shape)
            loss = loss / n_batches
            with backward_named(self.model):
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        if self.reduce is not None:
            total, norm = self.reduce(total, norm)
        if self.scaler.is_enabled():  # fp16: the scaler skips a step whose gradients are not finite itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # A non-finite loss or gradient never reaches the weights, state and step count included: every entry of
            # OPTIMIZERS honours found_inf on the device, so the step never waits on the host.
            self.optimizer.found_inf = (~(torch.isfinite(total) & torch.isfinite(norm))).float()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm
