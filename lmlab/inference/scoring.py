"""Log-likelihoods of continuations given their contexts, many per forward, in fp32: what multiple-choice tasks and the
server's `logprobs` are made of. A choice is scored as lm-evaluation-harness scores a (context, continuation) pair of
token ids; choices that share a context share its forward, the context read once into a row of the decode state and
copied to a row per choice."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from lmlab.model import LanguageModel
from lmlab.model.base import DecodeState, new_state

LOGITS_ELEMENTS = 2**27  # the most logits (rows x positions x vocab) one forward may return: 512 MiB in fp32
STATE_BYTES = 2**30  # the most memory the decode state of shared contexts may take
T = TypeVar("T")


@dataclass(frozen=True)
class Choice:
    """A continuation to score after a context, both token ids; the context holds at least one token."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def window(self, block_size: int) -> tuple[int, ...]:
        """What the model reads: the last block_size + 1 tokens of context + continuation, but the last."""
        return (self.context + self.continuation)[-(block_size + 1):-1]

    def truncated(self, block_size: int) -> bool:
        return len(self.context) + len(self.continuation) > block_size + 1


@dataclass(frozen=True)
class TokenScore:
    """One token of a sequence with its log-probability (None for a first token) and the likeliest tokens at its
    position with theirs."""

    token: int
    logprob: float | None
    top_ids: list[int]
    top_logprobs: list[float]


def token_scores(logits: torch.Tensor, targets: torch.Tensor, top: int = 0) -> list[TokenScore]:
    """Each of `targets` (n,) with its log-probability in fp32 under (n, vocab) logits, and the `top` likeliest tokens
    with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(min(max(top, 0), logprobs.size(-1)), dim=-1)
    return [TokenScore(*score) for score in zip(targets.tolist(), chosen, ids.tolist(), values.tolist())]


@torch.no_grad()
def loglikelihoods(model: LanguageModel, choices: Sequence[Choice], share: bool = True, max_rows: int = 64,
                   max_tokens: int = 16384, progress: Callable[[int], None] | None = None) -> list[float]:
    """The summed log-probability of each choice's continuation given its context, in fp32. Consecutive choices with the
    same context share its forward when `share`; at most `max_rows` rows and `max_tokens` positions go into a forward.
    Each continuation must hold from 1 to block_size tokens. `progress(n)` is told when n more choices are scored."""
    block, vocab = model.config.block_size, model.config.vocab_size
    assert all(0 < len(c.continuation) <= block and c.context for c in choices), "a choice the window cannot hold"
    scores: list[float] = [0.0] * len(choices)
    # Choices share a context's forward through a decode state: a model that keeps none scores each alone.
    share = share and model.new_cache(1, torch.device("meta"), torch.float32) is not None
    groups = []
    for context, same in itertools.groupby(range(len(choices)), key=lambda i: choices[i].context):
        # a run of consecutive choices with one context, shared when there is something to share
        run = list(same)
        whole = not any(choices[i].truncated(block) for i in run)
        groups += [run] if share and len(context) > 1 and len(run) > 1 and whole else [[i] for i in run]
    shared = [g for g in groups if len(g) > 1]
    if shared:
        _score_shared(model, choices, shared, scores, max_rows, max_tokens, progress)
    # The others longest first, so that the rows of a forward are of similar lengths and pad little.
    alone = sorted((g[0] for g in groups if len(g) == 1), key=lambda i: -len(choices[i].window(block)))

    def fits(batch: list[int]) -> bool:
        scored = sum(len(choices[i].continuation) for i in batch)
        return (len(batch) <= max_rows and len(batch) * len(choices[batch[0]].window(block)) <= max_tokens
                and scored * vocab <= LOGITS_ELEMENTS)

    for batch in _batches(alone, fits):  # each choice a row from position 0
        _score_rows(model, choices, batch, [choices[i].window(block) for i in batch], scores)
        if progress:
            progress(len(batch))
    return scores


def _batches(units: list[T], fits: Callable[[list[T]], bool]) -> Iterator[list[T]]:
    """The units in order, in batches as large as `fits` allows (a unit alone is always a batch)."""
    batch: list[T] = []
    for unit in units:
        if batch and not fits([*batch, unit]):
            yield batch
            batch = []
        batch.append(unit)
    if batch:
        yield batch


def _score_rows(model: LanguageModel, choices: Sequence[Choice], order: list[int],
                inputs: list[tuple[int, ...]], scores: list[float], cache: DecodeState | None = None) -> None:
    """Score the choices `order` names, a row each: the row's `inputs` read (padded on the right), the choice's
    continuation's summed log-probability read at the row's last positions (the head applied at those only)."""
    device = next(model.parameters()).device
    targets = [choices[i].continuation for i in order]
    idx = torch.nn.utils.rnn.pad_sequence([torch.tensor(tokens) for tokens in inputs], batch_first=True)
    rows = torch.tensor([r for r, t in enumerate(targets) for _ in t], device=device)
    positions = torch.tensor([len(x) - len(t) + k for x, t in zip(inputs, targets) for k in range(len(t))],
                             device=device)
    flat = torch.tensor([token for t in targets for token in t], device=device)
    logits = model.logits_at(idx.to(device), rows, positions, cache)  # (tokens scored, vocab)
    per_token = torch.log_softmax(logits.float(), dim=-1).gather(1, flat[:, None])[:, 0]
    sums = torch.zeros(len(targets), dtype=torch.float64, device=device)
    sums.index_add_(0, rows, per_token.double())
    for i, value in zip(order, sums.tolist()):
        scores[i] = value


def _score_shared(model: LanguageModel, choices: Sequence[Choice], groups: list[list[int]], scores: list[float],
                  max_rows: int, max_tokens: int, progress: Callable[[int], None] | None) -> None:
    """Groups of choices sharing a context, a forward for as many groups as the limits allow (the longest first, so that
    rows pad little): each group's context (but its last token) read into its first row and copied to the group's
    other rows, then every choice read on from there in one forward."""
    device = next(model.parameters()).device
    per_row = sum(t.numel() * t.element_size() for t in new_state(model, 1, device, torch.float32).tensors())
    capacity = max(max(map(len, groups)), min(max_rows, STATE_BYTES // max(1, per_row)))
    state = new_state(model, capacity, device, torch.float32)
    block, vocab = model.config.block_size, model.config.vocab_size
    nothing = torch.zeros(0, dtype=torch.long, device=device)

    def fits(batch: list[list[int]]) -> bool:
        held = [i for group in batch for i in group]
        width = max(len(choices[i].continuation) for i in held)
        deepest = max(len(choices[group[0]].context) - 1 for group in batch)  # what a row holds before its choice
        scored = sum(len(choices[i].continuation) for i in held)
        return (len(held) <= capacity and len(held) * width <= max_tokens and deepest + width <= block
                and scored * vocab <= LOGITS_ELEMENTS)

    for batch in _batches(sorted(groups, key=lambda g: -max(len(choices[i].continuation) for i in g)), fits):
        row = 0
        for group in batch:
            context = choices[group[0]].context
            first = state.rows(row, row + 1)
            first.reset(0)
            # the states only: the head reads no position
            model.logits_at(torch.tensor([context[:-1]], device=device), nothing, nothing, first)
            for other in range(row + 1, row + len(group)):
                state.move(row, other, len(context) - 1)
            row += len(group)
        order = [i for group in batch for i in group]
        inputs = [(choices[i].context[-1],) + choices[i].continuation[:-1] for i in order]
        # The rows hold their context but its last token; the choices go on from there, attending to no further.
        held = max(len(choices[group[0]].context) for group in batch) - 1 + max(map(len, inputs))
        _score_rows(model, choices, order, inputs, scores, state.rows(0, len(order)).shortened(held))
        if progress:
            progress(len(order))
