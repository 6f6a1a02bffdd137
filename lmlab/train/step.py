"""The one training step: the training loop, fine-tuning and `lmlab bench` all run this code."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from lmlab.core.config import TrainConfig
from lmlab.core.device import autocast, compile_choice, triton_available
from lmlab.model import LanguageModel
from lmlab.train.optim import optimizer_of

Batch = tuple[torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainStep:
    """The optimizer, the fp16 grad scaler and the (maybe compiled, maybe DDP- or FSDP-wrapped) forward of one
    model, and the step that uses them: forward and backward over the micro-batches, unscale, clip, skip the
    update if the loss or the gradient is not finite, update, zero the gradients.

    `wrapped` is what runs forward when it is not the model itself (a DDP wrapper, an FSDP-sharded model);
    `reduce` makes the loss and gradient norm global under torchrun, so every rank skips alike. `note` is a line
    for the user when `compile = "auto"` could not compile here, else None.
    """

    def __init__(self, model: LanguageModel, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 wrapped: torch.nn.Module | None = None, reduce: Reduce | None = None):
        self.model, self.device, self.dtype, self.grad_clip, self.reduce = model, device, dtype, cfg.grad_clip, reduce
        compiled, self.note = compile_choice(cfg.compile, device.type, device.type == "cuda" and triton_available())
        if compiled:
            # One compiled model at a time per process: sweeps, bench and the GPU report build many, and past
            # Dynamo's recompile limit (8 per function) it would silently run the next ones eager.
            torch.compiler.reset()
        self.forward = torch.compile(wrapped or model) if compiled else (wrapped or model)
        self.optimizer = optimizer_of(cfg).build(model, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, batches: Iterable[Batch], n_batches: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at `lr` over `n_batches` micro-batches; returns (mean loss, gradient norm) as device
        tensors, without a host sync, so the caller decides when to read them."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            loss = loss / n_batches
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        if self.reduce is not None:
            total, norm = self.reduce(total, norm)
        if not self.scaler.is_enabled():  # (the fp16 scaler sets this itself)
            # A non-finite loss or gradient never reaches the weights: the fused AdamW kernel skips the whole
            # update, moments and step count included, when found_inf is 1, decided on the device (Muon: optim.py).
            self.optimizer.found_inf = (~(torch.isfinite(total) & torch.isfinite(norm))).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm
