"""Scaling arithmetic: Chinchilla-optimal tokens and power-law fits of loss against compute or parameters
(compute as `LanguageModel.flops_per_token` × tokens, the one definition)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmlab.errors import UserError

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
