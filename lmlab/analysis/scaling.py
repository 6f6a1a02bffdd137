"""Scaling arithmetic: Chinchilla-optimal tokens and power-law fits of loss against compute or parameters
(compute as `LanguageModel.flops_per_token` × tokens, the one definition)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmlab.core.errors import UserError

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses ~20 tokens per parameter
# Muennighoff et al. 2023 (Scaling Data-Constrained Language Models): up to about 4 passes over the same data, a
# repeated token trains about as well as a new one; past that its worth falls fast (near nothing by ~16 passes).
REPEAT_LIMIT = 4.0
# Their fit of what repeats are worth: U unique tokens seen 1 + R times train as U + U·R*·(1 - e^(-R/R*)) new ones,
# with R* about 15.4: a few passes nearly as good as new text, and never more than (1 + R*)·U however many.
REPEAT_WORTH = 15.4


def chinchilla_percent(tokens: int, params: int) -> float:
    """Tokens as a percentage of the compute-optimal 20 tokens per parameter."""
    return 100.0 * tokens / (CHINCHILLA_TOKENS_PER_PARAM * params)


def unique_tokens(tokens: int, split_tokens: int | None) -> int:
    """The distinct tokens among `tokens` drawn from a split of `split_tokens` (at most the split; all of them when
    the split is not known). Chinchilla's 20 per parameter are distinct tokens: repeats are not new data."""
    return min(tokens, split_tokens) if split_tokens else tokens


def effective_tokens(tokens: float, unique: int | None) -> float:
    """The new tokens that `tokens` drawn over and over from a split of `unique` are worth (REPEAT_WORTH): all of them
    within one pass, or where the split is not known."""
    if not unique or tokens <= unique:
        return tokens
    return unique * (1 + REPEAT_WORTH * (1 - math.exp(-(tokens / unique - 1) / REPEAT_WORTH)))


def repeat_warning(passes: float | None, split_tokens: int | None, what: str) -> str | None:
    """A sentence when `what` passes over its data more than REPEAT_LIMIT times, else None."""
    if passes is None or split_tokens is None or passes <= REPEAT_LIMIT:
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


def fit_power_law(x: Sequence[float], y: Sequence[float], names: list[str], x_label: str) -> PowerLawFit:
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


# The exponents a loss surface is searched over (Hoffmann et al. fit alpha 0.34, beta 0.28 on text; a character
# model's need not match, so the grid spans small to steep), then refined around the best pair by REFINED steps.
# Given the exponents the surface is linear in E, A, B.
EXPONENTS = np.round(np.arange(0.05, 1.501, 0.05), 3)
REFINED = 0.01


@dataclass(frozen=True)
class LossSurface:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022's third approach): the val loss a model of N
    parameters reaches after D training tokens at its family's settings, fitted on a miniseries of runs."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rmse: float  # of the fit, in loss units, over the runs it was fitted on

    def predict(self, params: float, tokens: float) -> float:
        return float(self.E + self.A / params ** self.alpha + self.B / tokens ** self.beta)

    def describe(self) -> str:
        return (f"L = {self.E:.3f} + {self.A:.4g} / N^{self.alpha:.3f} + {self.B:.4g} / D^{self.beta:.3f} "
                f"(rmse {self.rmse:.4f})")


def surface_refusal(params: list[float], tokens: list[float], given: str = "there are") -> str | None:
    """Why no loss surface can be fitted through runs of these sizes and lengths, `given` introducing their count
    (None: one can). It has five numbers, so it needs five runs of distinct (size, length), two sizes at least and
    two lengths: the same point twice says nothing new of its shape."""
    points = set(zip(params, tokens))
    sizes, lengths = len({n for n, _ in points}), len({d for _, d in points})
    if len(points) >= 5 and sizes >= 2 and lengths >= 2:
        return None
    return (f"a loss surface L(N, D) needs at least 5 runs of at least 2 sizes and 2 lengths, and {given} "
            f"{len(points)} run{'s' * (len(points) != 1)} of {sizes} size{'s' * (sizes != 1)} and {lengths} "
            f"length{'s' * (lengths != 1)}")


def fit_loss_surface(params: list[float], tokens: list[float], losses: list[float]) -> LossSurface:
    """The surface through (params, tokens, loss) points with the least squared error: every pair of exponents of
    EXPONENTS, the non-negative E, A, B of each by least squares (a term that would be negative is left out)."""
    refused = surface_refusal(params, tokens)
    if refused:
        raise UserError(f"{refused}; pass more runs of other sizes or lengths.")
    n, d, y = np.asarray(params, float), np.asarray(tokens, float), np.asarray(losses, float)
    best = _best_exponents(n, d, y, EXPONENTS, EXPONENTS)
    near = np.arange(-0.05, 0.051, REFINED)
    best = _best_exponents(n, d, y, np.clip(best[2] + near, 0.01, None), np.clip(best[3] + near, 0.01, None))
    error, (e, a, b), alpha, beta = best
    return LossSurface(float(e), float(a), round(float(alpha), 3), float(b), round(float(beta), 3),
                       float(np.sqrt(error)))


def _best_exponents(n: np.ndarray, d: np.ndarray, y: np.ndarray, alphas: np.ndarray,
                    betas: np.ndarray) -> tuple[float, np.ndarray, float, float]:
    """(mean squared error, (E, A, B), alpha, beta) of the best pair of exponents of the two grids (the first of
    the least error)."""
    def fitted(alpha: float, beta: float) -> tuple[float, np.ndarray, float, float]:
        terms = np.stack([np.ones_like(y), n ** -alpha, d ** -beta], axis=1)
        coef = _nonnegative_lstsq(terms, y)
        return float(np.mean((terms @ coef - y) ** 2)), coef, alpha, beta

    return min((fitted(alpha, beta) for alpha in alphas for beta in betas), key=lambda found: found[0])


def _nonnegative_lstsq(terms: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: of the subsets of the columns, the best solution whose
    coefficients are all non-negative (three columns: eight subsets, checked whole)."""
    columns = terms.shape[1]
    fits = []
    for mask in range(1, 2 ** columns):
        keep = [i for i in range(columns) if mask >> i & 1]
        full = np.zeros(columns)
        full[keep] = np.linalg.lstsq(terms[:, keep], y, rcond=None)[0]
        if not (full < 0).any():
            fits.append(full)
    # the first of the least error; none at all where no subset's is non-negative
    return min([*fits, np.zeros(columns)], key=lambda coef: float(((terms @ coef - y) ** 2).sum()))
