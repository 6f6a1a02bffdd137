"""Optimizers (AdamW, or Muon for hidden matrices with AdamW for the rest) and LR schedules (warmup then
cosine, or warmup-stable-decay)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lmlab.core.config import TrainConfig
from lmlab.model import LanguageModel


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    # Matrices (linear layers, embeddings) get weight decay; biases and norm gains do not,
    # since shrinking them toward zero only fights the normalisation.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # Fused on every device: one kernel per step, and it honours `found_inf`, which lets the loop skip a
    # non-finite step without reading the loss back to the host.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


class MuonAdamW:
    """torch.optim.Muon for the hidden 2-D weights and fused AdamW for everything else, as one optimizer.

    Muon orthogonalises each matrix's momentum, which suits the weights that map hidden states to hidden
    states; embeddings, the output head, norm gains and biases are not such maps (or are not matrices), so
    they stay with AdamW (Jordan et al. 2024). `adjust_lr_fn="match_rms_adamw"` scales Muon's update to
    the RMS of an AdamW update (Liu et al. 2025, "Muon is scalable"), so one learning rate, schedule and
    weight decay serve both halves and no second LR needs tuning.

    `param_groups`, `state_dict()` and `load_state_dict()` look like one torch optimizer's (Muon's groups
    first), so the LR schedule, the grad scaler and the safetensors checkpoint format work unchanged.
    """

    def __init__(self, model: LanguageModel, cfg: TrainConfig):
        hidden, rest = muon_groups(model)
        self.muon = torch.optim.Muon(hidden, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = _adamw(rest, cfg)
        self.found_inf: torch.Tensor | None = None  # set by the training loop: 1 skips the whole step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        # Muon has no on-device `found_inf`, so a non-finite step is skipped, by both halves, after one host
        # read of the flag: free on the CPU; on a GPU it ends the loop's queue-ahead once per step.
        if self.found_inf is not None and self.found_inf.item():
            return
        self.muon.step()
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
        n_groups = len(self.muon.param_groups)
        offset = sum(len(g["params"]) for g in self.muon.param_groups)
        first, second = state_dict["param_groups"][:n_groups], state_dict["param_groups"][n_groups:]
        state = {int(i): s for i, s in state_dict["state"].items()}
        self.muon.load_state_dict({"param_groups": first, "state": {i: s for i, s in state.items() if i < offset}})
        self.adamw.load_state_dict({
            "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in second],
            "state": {i - offset: s for i, s in state.items() if i >= offset},
        })


def muon_groups(model: LanguageModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The model's hidden matrices (Muon) and every other trainable parameter (AdamW): each parameter in
    exactly one of them, or a model kind's `hidden_matrices` is wrong."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in model.hidden_matrices() if p.requires_grad]
    ids = {id(p) for p in params}
    assert len({id(p) for p in hidden}) == len(hidden) and all(id(p) in ids for p in hidden), \
        f"{type(model).__name__}.hidden_matrices() repeats a parameter or names one the model does not have"
    assert all(p.dim() == 2 for p in hidden), f"{type(model).__name__}.hidden_matrices() holds a non-matrix"
    chosen = {id(p) for p in hidden}
    return hidden, [p for p in params if id(p) not in chosen]


def make_optimizer(model: LanguageModel, cfg: TrainConfig) -> torch.optim.AdamW | MuonAdamW:
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg)
    return _adamw([p for p in model.parameters() if p.requires_grad], cfg)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then the schedule's decay to min_lr.

    cosine: a half cosine to min_lr at lr_decay_iters (default max_iters).
    wsd (warmup-stable-decay): constant at the peak, then over the last decay_fraction of max_iters a
    1-sqrt decay to min_lr (Hägele et al. 2024 found 1-sqrt better than linear). The constant phase makes
    any earlier checkpoint a good start for a longer run: only the short decay has to be redone.
    """
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_iters, round(cfg.max_iters * (1.0 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.learning_rate
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_iters - decay_start))
        return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    return _cosine((step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters), cfg)


def _cosine(progress: float, cfg: TrainConfig) -> float:
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def lr_at_position(position: float, cfg: TrainConfig) -> float:
    """The schedule's LR after warmup at `position`, from 0 (the peak) to 1 (min_lr), for a schedule laid over steps
    that change as it goes (a time budget's): cosine, or wsd's constant peak and then its 1-sqrt decay over the last
    decay_fraction of the positions."""
    if cfg.schedule != "wsd":
        return _cosine(position, cfg)
    stable = 1.0 - cfg.decay_fraction
    if position < stable:
        return cfg.learning_rate
    progress = (position - stable) / cfg.decay_fraction
    return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)


def position_between(step: int, anchor: int, position: float, last: int) -> float:
    """A schedule laid from `position` at step `anchor` to 1 (min_lr) at step `last`, linear in the steps: where it
    stands at `step`."""
    if last <= anchor:
        return 1.0
    return min(1.0, position + (1.0 - position) * max(0, step - anchor) / (last - anchor))


def position_of(lr: float, cfg: TrainConfig) -> float:
    """Where the schedule's LR is `lr` (`lr_at_position`'s inverse, clipped to [0, 1]): the peak is 0, even in wsd's
    stable stretch, which continues from there."""
    span = cfg.learning_rate - cfg.min_lr
    share = 1.0 if span <= 0 else min(1.0, max(0.0, (lr - cfg.min_lr) / span))
    if cfg.schedule == "wsd":
        return 0.0 if share >= 1.0 else 1.0 - cfg.decay_fraction + cfg.decay_fraction * (1.0 - share) ** 2
    return math.acos(2.0 * share - 1.0) / math.pi
