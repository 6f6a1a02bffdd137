"""Choosing each row's next token from its logits: greedy, or drawn after temperature, top-k and top-p, each row with
its own settings and random stream, so that a sequence's draws never depend on its neighbours in a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmlab.core.config import SamplingParams


def _per_row(value: object, rows: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def filter_logits(logits: torch.Tensor, temperature: float | Sequence[float], top_k: int | None | Sequence[int | None],
                  top_p: float | Sequence[float]) -> torch.Tensor:
    """(vocab,) or (rows, vocab) logits divided by the temperature, with the tokens top_k and top_p rule out set
    to -inf. Each setting is one value for every row, or a list of one per row (top_k None: no limit)."""
    rows = logits.float().reshape(-1, logits.size(-1))
    n, vocab = rows.shape
    temperatures, ks, ps = (_per_row(v, n) for v in (temperature, top_k, top_p))
    if len(set(temperatures)) > 1:
        rows = rows / torch.tensor(temperatures, device=rows.device)[:, None]
    elif temperatures[0] != 1:  # one temperature for every row (a server's usual step): no tensor to build
        rows = rows / temperatures[0]
    ks = [min(k, vocab) if k else vocab for k in ks]
    if min(ks) < vocab:
        top = torch.topk(rows, max(ks), dim=-1).values  # (n, max k), descending
        kth = top.gather(1, torch.tensor(ks, device=rows.device)[:, None] - 1)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    if min(ps) < 1.0:
        # Nucleus: keep the likeliest tokens until their probabilities reach top_p (the first always stays).
        sorted_logits, order = torch.sort(rows, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        p = torch.tensor(ps, device=rows.device)[:, None]
        outside = (probs.cumsum(-1) - probs >= p) & (p < 1.0)
        rows = rows.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return rows.view(logits.shape)


def choose(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row of (rows, vocab) logits under its own SamplingParams.

    A sampled row takes one uniform draw from its own generator per token and picks the token where that draw
    falls in its cumulative probabilities (inverse transform sampling), so its draws are the same whatever the
    other rows are; all rows are filtered and summed together, and read back to the host once.
    """
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return logits.argmax(-1).tolist()
    # Every row sampled (a server's usual step): no argmax, no gather and scatter of the sampled rows. Each op
    # here costs microseconds at a few rows, which is what a step costs in all at batch 1 (compiled).
    every = len(sampled) == len(params)
    chosen = params if every else [params[i] for i in sampled]
    probs = torch.softmax(filter_logits(logits if every else logits[sampled], [p.temperature for p in chosen],
                                        [p.top_k for p in chosen], [p.top_p for p in chosen]), dim=-1)
    cdf = probs.cumsum(-1)
    each = [torch.rand(1, generator=generators[i], device=logits.device) for i in sampled]
    draws = each[0] if len(each) == 1 else torch.cat(each)
    picks = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.size(-1) - 1)
    if every:
        return picks.tolist()
    tokens = logits.argmax(-1)
    tokens[sampled] = picks
    return tokens.tolist()
