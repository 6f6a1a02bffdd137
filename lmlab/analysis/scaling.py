"""Scaling arithmetic: Chinchilla-optimal tokens and power-law fits of loss against compute or parameters
(compute as `LanguageModel.flops_per_token` × tokens, the one definition)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmlab.core.errors import UserError

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses ~20 tokens per parameter
# Muennighoff et al. 2023 (Scaling Data-Constrained Language Models): up to about 4 passes over the same data, a
# repeated token trains about as well as a new one; past that its worth falls fast (near nothing by ~16 passes).
REPEAT_LIMIT = 4.0


def chinchilla_percent(tokens: int, params: int) -> float:
    """Tokens as a percentage of the compute-optimal 20 tokens per parameter."""
    return 100.0 * tokens / (CHINCHILLA_TOKENS_PER_PARAM * params)


def unique_tokens(tokens: int, split_tokens: int | None) -> int:
    """The distinct tokens among `tokens` drawn from a split of `split_tokens` (at most the split; all of them when
    the split is not known). Chinchilla's 20 per parameter are distinct tokens: repeats are not new data."""
    return min(tokens, split_tokens) if split_tokens else tokens


def repeat_warning(passes: float | None, split_tokens: int | None, what: str) -> str | None:
    """A sentence when `what` passes over its data more than REPEAT_LIMIT times, else None."""
    if passes is None or passes <= REPEAT_LIMIT:
        return None
    return (f"{what} passes over its {split_tokens:,}-token train split {passes:.1f} times: past about "
            f"{REPEAT_LIMIT:g} passes a repeated token is worth much less than a new one (Muennighoff et al. 2023, "
            f"Scaling Data-Constrained Language Models); {int(REPEAT_LIMIT * split_tokens):,} tokens are "
            f"{REPEAT_LIMIT:g} passes, or prepare more text.")


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


def fit_caveats(names: list[str], tokens: list[int], params: list[int], still_falling: list[bool | None]) -> list[str]:
    """Why a power law through these runs would mislead, one sentence each: runs not converged (still falling,
    a small share of Chinchilla-optimal tokens), compute and parameters not varied independently, two points."""
    n, found = len(names), []
    falling = [name for name, f in zip(names, still_falling) if f]
    if falling:
        found.append(f"{len(falling)} of {n} runs were still improving at their last evaluation "
                     f"({', '.join(falling)}): their best losses are not what their sizes can reach.")
    short = [name for name, t, p in zip(names, tokens, params) if chinchilla_percent(t, p) < 50]
    if short:
        found.append(f"{len(short)} of {n} runs saw under half their Chinchilla-optimal tokens ({', '.join(short)}): "
                     "far from converged, so the fits measure training length as much as size.")
    if max(tokens) <= 1.01 * min(tokens):
        found.append("every run saw the same tokens, so compute is proportional to parameters and the two fits are "
                     "one fit: vary tokens and sizes independently to tell them apart.")
    if max(params) <= 1.01 * min(params):
        found.append("every run has the same size, so nothing is learned about parameters; only tokens vary.")
    if n == 2:
        found.append("a line through two runs fits them exactly: its error says nothing; add runs.")
    return found
