"""What a training run will cost before it starts (`lmlab plan`): parameters, tokens, FLOPs and wall time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmlab.bench import bench_batch, with_vocab
from lmlab.config import RunConfig
from lmlab.device import resolve_device
from lmlab.errors import UserError
from lmlab.model import build_model
from lmlab.scaling import CHINCHILLA_TOKENS_PER_PARAM


@dataclass
class Plan:
    params: int
    params_non_embedding: int
    flops_per_token: float  # LanguageModel.flops_per_token(): compute is this × tokens, as everywhere in lmlab
    tokens_per_step: int
    tokens: int
    tokens_source: str
    tokens_per_sec: float
    rate_source: str

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_sec

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAM * self.params


def measure_tokens_per_sec(cfg: RunConfig, device_name: str) -> tuple[float, str]:
    """Training tokens/s of `cfg` on this device, and how it was measured.

    Tokens/s does not depend on accumulation, so one micro-batch per step is timed. A CPU's matmuls are already
    large at a micro-batch of 2, and a GPU-sized batch could exhaust a laptop's memory.
    """
    device = resolve_device(device_name)
    micro = cfg.train.batch_size if device.type != "cpu" else min(cfg.train.batch_size, 2)
    one_step = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=1))
    row = bench_batch(one_step, micro, 3, device_name, warmup=1)
    if row.out_of_memory:
        raise UserError(f"train.batch_size {cfg.train.batch_size} does not fit on this device; lower it or pass "
                        "--tokens-per-sec.")
    return row.tokens_per_sec, f"measured here on {device}, micro-batch {micro}"


def make_plan(cfg: RunConfig, tokens: int | None = None, chinchilla: bool = False,
              tokens_per_sec: float | None = None, device: str = "auto") -> Plan:
    """The plan for `tokens` training tokens (or Chinchilla's 20 per parameter, or the config's max_iters steps)
    at `tokens_per_sec` (or a rate measured here)."""
    cfg = with_vocab(cfg)
    with torch.device("meta"):  # counts parameters without allocating them
        model = build_model(cfg.model)
    params = model.num_params()
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.model.block_size
    if tokens:
        source = "--tokens"
    elif chinchilla:
        tokens, source = CHINCHILLA_TOKENS_PER_PARAM * params, "20 tokens per parameter (Chinchilla)"
    else:
        tokens, source = cfg.train.max_iters * tokens_per_step, "train.max_iters x tokens per step"
    rate, rate_source = (tokens_per_sec, "given") if tokens_per_sec else measure_tokens_per_sec(cfg, device)
    return Plan(params, model.num_params(embeddings=False), model.flops_per_token(), tokens_per_step, tokens, source,
                rate, rate_source)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
