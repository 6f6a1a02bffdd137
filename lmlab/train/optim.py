"""The optimizers `train.optimizer` names (`OPTIMIZERS`, one per name of core/config.py's OPTIMIZER_NAMES), each with
how it is built, what the memory check counts of its state and whether FSDP may shard what it updates; every one
skips a non-finite step on the device (`found_inf`)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.core.config import TrainConfig
from lmlab.core.errors import UserError
from lmlab.core.peak import native_kernel
from lmlab.model import LanguageModel
from lmlab.model.memory import two_moments


class Eager:
    """A torch optimizer's methods without the wrappers torch puts around them for torch.compile (Dynamo's `disable`,
    and `step`'s graph breaks): each imports torch._dynamo at its first call, about a second of every CPU run's start
    (benchmarks/startup.py). They matter only where an optimizer is called inside a compiled function, which lmlab
    never does: train.compile compiles the model's forward alone. Put first among an optimizer's bases (`class
    AdamW(Eager, torch.optim.AdamW)`); tests/test_optim.py holds every entry of `OPTIMIZERS` to training without
    torch._dynamo."""

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)


class AdamW(Eager, torch.optim.AdamW):
    found_inf: torch.Tensor | None = None  # what torch's fused kernel reads: 1 skips the step on the device
    step = torch.no_grad()(inspect.unwrap(torch.optim.AdamW.step))


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> AdamW:
    # Biases and norm gains get no weight decay: shrinking them toward zero only fights the normalisation.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # Fused on every device: one kernel per step, and it honours `found_inf`.
    return AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def orthogonal_dtype(device: torch.device) -> torch.dtype:
    """The dtype Muon orthogonalises in on `device`: bfloat16, as torch.optim.Muon does, where the device has a bf16
    matmul kernel of its own; float32 where bf16 is emulated (docs/reference/training.md: the speed it gives). Not
    measured per process: every rank of a run must orthogonalise alike."""
    return torch.bfloat16 if native_kernel(device, torch.bfloat16) else torch.float32


def orthogonalise(updates: torch.Tensor, group: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (torch.optim.Muon's) in `dtype` on a stack of same-shaped matrices, each
    apart, in batched matmuls: it brings every singular value of each near 1 without an SVD."""
    a, b, c = group["ns_coefficients"]
    wide = updates.size(-2) <= updates.size(-1)  # iterate on the smaller Gram matrix
    x = (updates if wide else updates.mT).to(dtype)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=group["eps"])  # a spectral norm of at most 1: it converges
    for _ in range(group["ns_steps"]):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


class Muon(Eager, torch.optim.Muon):
    """torch.optim.Muon (its settings, state and checkpoint keys, its result bit for bit) orthogonalising in `ns_dtype`
    (`orthogonal_dtype`) rather than always in bfloat16, a shape's matrices at once (layers repeat a few shapes). Only
    `adjust_lr_fn="match_rms_adamw"`: the update scaled by 0.2·sqrt(max(rows, cols)), the RMS of an AdamW update (Liu
    et al. 2025, "Muon is scalable")."""

    stack = 1 << 24  # elements of a shape's matrices orthogonalised at once: the step's copies stay small

    def __init__(self, params: list[torch.nn.Parameter], ns_dtype: torch.dtype, **settings: Any):
        super().__init__(params, adjust_lr_fn="match_rms_adamw", **settings)
        self.ns_dtype = ns_dtype

    # torch types Optimizer.step as overloads (with a closure, without) that torch.optim.Muon's own step does not match
    @torch.no_grad()
    def step(self, skip: torch.Tensor | None = None) -> None:  # type: ignore[override]  # MuonAdamW's, no closure
        """One update; `skip` (a bool device tensor) true leaves the weights and momentum as they were, bit for bit,
        without a host read: the update is computed and then not kept."""
        for group in self.param_groups:
            lr, momentum, live = group["lr"], group["momentum"], [p for p in group["params"] if p.grad is not None]
            for p in (p for p in live if "momentum_buffer" not in self.state[p]):
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            for shape in dict.fromkeys(p.shape for p in live):
                same, per = [p for p in live if p.shape == shape], max(1, self.stack // shape.numel())
                scale = lr * (0.2 * math.sqrt(max(shape)))
                for params in (same[i:i + per] for i in range(0, len(same), per)):
                    bufs, grads = [self.state[p]["momentum_buffer"] for p in params], [p.grad for p in params]
                    moved = torch._foreach_lerp(bufs, grads, 1 - momentum)
                    updates = torch._foreach_lerp(grads, moved, momentum) if group["nesterov"] else moved
                    orthogonal = orthogonalise(torch.stack(updates), group, self.ns_dtype)
                    for p, buf, new_buf, update in zip(params, bufs, moved, orthogonal):
                        stepped = p.mul(1 - lr * group["weight_decay"]).add_(update, alpha=-scale)
                        for old, new in ((buf, new_buf), (p, stepped)):
                            old.copy_(new if skip is None else torch.where(skip, old, new))


class MuonAdamW:
    """Muon for the hidden 2-D weights and fused AdamW for everything else (embeddings, the head, norm gains, biases),
    as one optimizer (Jordan et al. 2024). Muon's update is scaled to the RMS of an AdamW update, so one learning rate,
    schedule and weight decay serve both halves. `param_groups` and the state dicts look like one torch optimizer's
    (Muon's groups first), so the schedule, the grad scaler and checkpoints work unchanged."""

    def __init__(self, model: LanguageModel, cfg: TrainConfig, device: torch.device):
        hidden, rest = muon_groups(model)
        self.muon = Muon(hidden, orthogonal_dtype(device), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.adamw = _adamw(rest, cfg)

    # The grad scaler hands a step its flag (`found_inf`) rather than reading it on the host; TrainStep unscales first.
    _step_supports_amp_scaling = True
    found_inf: torch.Tensor | None = None  # set by the training step or the grad scaler: 1 skips the whole step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        """Both halves, or neither where `found_inf` is 1: decided on the device (fused AdamW honours the flag)."""
        assert getattr(self, "grad_scale", None) is None, "Muon takes unscaled gradients: unscale_ before step"
        self.adamw.found_inf = self.found_inf
        self.muon.step(None if self.found_inf is None else self.found_inf.bool())
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Both halves as one torch-style state dict: AdamW's parameter indices follow Muon's."""
        first, second = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(g["params"]) for g in first["param_groups"])
        state = {**first["state"], **{i + offset: s for i, s in second["state"].items()}}
        groups = first["param_groups"] + [{**g, "params": [i + offset for i in g["params"]]}
                                          for g in second["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n_groups, offset = len(self.muon.param_groups), sum(len(g["params"]) for g in self.muon.param_groups)
        shifted = [{**g, "params": [i - offset for i in g["params"]]} for g in state_dict["param_groups"][n_groups:]]
        state = {int(i): s for i, s in state_dict["state"].items()}
        self.muon.load_state_dict({"param_groups": state_dict["param_groups"][:n_groups],
                                   "state": {i: s for i, s in state.items() if i < offset}})
        self.adamw.load_state_dict({"param_groups": shifted,
                                    "state": {i - offset: s for i, s in state.items() if i >= offset}})


def muon_groups(model: LanguageModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The model's hidden matrices (Muon) and every other trainable parameter (AdamW): each parameter in
    exactly one of them, or a model kind's `hidden_matrices` is wrong."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in model.hidden_matrices() if p.requires_grad]
    chosen = {id(p) for p in hidden}
    assert len(chosen) == len(hidden) and chosen <= {id(p) for p in params}, \
        f"{type(model).__name__}.hidden_matrices() repeats a parameter or names one the model does not have"
    assert all(p.dim() == 2 for p in hidden), f"{type(model).__name__}.hidden_matrices() holds a non-matrix"
    return hidden, [p for p in params if id(p) not in chosen]


@dataclass(frozen=True)
class Optimizer:
    """An optimizer lmlab trains with, every fact stated. `build` makes it for a model, the train settings and its
    device; `state_bytes(weights, hidden)` is the bytes of its state for `weights` bytes of weights, `hidden` of them
    the hidden matrices (what the memory check counts). What `build` returns honours `optimizer.found_inf` (a device
    tensor, 1 skips the whole update, state and step count included; set by the training step or the grad scaler), so
    no step waits on the host (tests/test_host_sync.py). `about` is its line in the config reference; `unsharded`, why
    FSDP cannot shard what it updates (None: it can). tests/test_optim.py holds every entry to these."""

    build: Callable[[LanguageModel, TrainConfig, torch.device], Any]
    state_bytes: Callable[[int, int], int]
    about: str
    unsharded: str | None


OPTIMIZERS = {
    "adamw": Optimizer(lambda model, cfg, device: _adamw([p for p in model.parameters() if p.requires_grad], cfg),
                       two_moments, about="AdamW, fused", unsharded=None),
    # Muon's one momentum for the hidden matrices, AdamW's two moments for the rest.
    "muon": Optimizer(MuonAdamW, lambda weights, hidden: two_moments(weights, hidden) - hidden,
                      about="Muon for hidden 2-D weights, AdamW for embeddings, head and the rest",
                      unsharded="Muon orthogonalises whole matrices, which FSDP holds as shards on different ranks"),
}


def choices() -> str:
    """The optimizers as the config reference lists them: `adamw (AdamW, fused) | muon (...)`."""
    return " | ".join(f"{name} ({entry.about})" for name, entry in OPTIMIZERS.items())


def optimizer_of(cfg: TrainConfig) -> Optimizer:
    """The optimizer `cfg` names, refused with `train.parallel = "fsdp"` when FSDP cannot shard it."""
    chosen = OPTIMIZERS[cfg.optimizer]
    if cfg.parallel == "fsdp" and chosen.unsharded:
        raise UserError(f"train.optimizer = \"{cfg.optimizer}\" does not work with train.parallel = \"fsdp\" "
                        f"({chosen.unsharded}); use parallel = \"ddp\" or optimizer = \"adamw\".")
    return chosen
