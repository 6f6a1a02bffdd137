"""Scaling arithmetic: training compute by 6·N·D, Chinchilla-optimal tokens, and power-law fits of loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmlab.errors import UserError
from lmlab.model import LanguageModel

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses ~20 tokens per parameter


def chinchilla_percent(tokens: int, params: int) -> float:
    """Tokens seen as a percentage of the compute-optimal 20 tokens per parameter."""
    return 100.0 * tokens / (CHINCHILLA_TOKENS_PER_PARAM * params)


@dataclass
class PowerLawFit:
    """L = a · x^b fitted by least squares in log-log space (b < 0 when more x helps)."""

    x: list[float]
    y: list[float]
    names: list[str]
    x_label: str
    a: float
    b: float
    rmse: float  # root-mean-square error of the fit in loss units
    r2: float  # coefficient of determination in log space

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(x, self.b)


def fit_power_law(x: list[float], y: list[float], names: list[str], x_label: str) -> PowerLawFit:
    if len(x) < 2 or len(set(x)) < 2:
        raise UserError(f"a power law against {x_label} needs at least two runs with different values of it; "
                        "pass more finished runs.")
    lx, ly = np.log(x), np.log(y)
    b, log_a = np.polyfit(lx, ly, 1)
    fitted = log_a + b * lx
    ss_res, ss_tot = float(((ly - fitted) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    rmse = float(np.sqrt(np.mean((np.exp(fitted) - np.asarray(y)) ** 2)))
    return PowerLawFit(list(x), list(y), names, x_label, float(np.exp(log_a)), float(b), rmse,
                       1.0 - ss_res / ss_tot if ss_tot else 1.0)


def flops_per_token(model: LanguageModel) -> float:
    """Training FLOPs per token: 6N for the N weights that multiply every token (forward 2N, backward 4N),
    which excludes lookup-only tables (the position table, an untied token table) but keeps a token table
    the tied head multiplies by. A transformer adds 12·L·H·Q·T for attention (PaLM appendix B; unchanged
    by grouped-query attention, which shares keys and values but still scores every query head); a
    recurrent model has no such term: each layer's input and hidden matrices are applied once per token.
    """
    cfg = model.config
    weights = 6.0 * (model.num_params() - model.lookup_params())
    if cfg.kind == "recurrent":
        return weights
    return weights + 12.0 * cfg.n_layer * cfg.n_embd * cfg.block_size


@dataclass
class Plan:
    """What a training run costs: `lmlab plan`."""

    params: int
    params_non_embedding: int
    tokens: int
    tokens_source: str
    tokens_per_sec: float
    rate_source: str

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_sec

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAM * self.params


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
