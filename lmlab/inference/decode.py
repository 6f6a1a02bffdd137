"""Decoding several sequences at once: one forward per step for every sequence in the batch, each in its own row of the
model's decode state. A sequence joins by prefilling its prompt into a free row and leaves at once when it ends, the
last row moving into its place, so a step computes no empty row (but those padding a bucketed step's rows up to the
shape it was made for). Results equal decoding each sequence alone."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from collections.abc import Sequence as Tensors
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmlab.core.config import SamplingParams
from lmlab.core.device import autocast
from lmlab.inference.quantize import held_as, state_dtype
from lmlab.inference.sampling import choose
from lmlab.inference.scoring import TokenScore, token_scores
from lmlab.model import LanguageModel
from lmlab.model.base import DecodeState

if TYPE_CHECKING:
    from lmlab.core.threads import Heard

# One decode step: the newest token of each row (rows, 1) and the state of those rows -> logits (rows, vocab).
Step = Callable[[torch.Tensor, DecodeState], torch.Tensor]


@dataclass(eq=False)
class Sequence:
    """One sequence being decoded: its tokens so far and how to choose the next; `pos` is how many tokens its row of
    the decoder's state holds (its row is its place in `Decoder.active`)."""

    ids: list[int]
    params: SamplingParams
    generated: int = 0
    pos: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)
    # Log-probabilities, asked by the server's `logprobs` and `echo`: None records none (and costs nothing); N
    # records each generated token's with the N likeliest alternatives, and with `echo` each prompt token's too.
    logprobs: int | None = None
    echo: bool = False
    scores: list[TokenScore] = field(default_factory=list)

    @property
    def exhausted(self) -> bool:
        return self.generated >= self.params.max_new_tokens


@dataclass(eq=False)
class ContextWindow(DecodeState):
    """The decode state of a model that carries none between tokens (a plugin without `new_cache`): each row's tokens,
    up to the context length, fed whole at every step; rows are padded on the right, which a causal model's earlier
    positions never see."""

    pos: torch.Tensor  # (B,) long
    ids: torch.Tensor  # (B, block_size) long

    def tensors(self) -> list[torch.Tensor]:
        return [self.pos, self.ids]

    @classmethod
    def over(cls, tensors: Tensors[torch.Tensor]) -> ContextWindow:
        return cls(*tensors)


def feed(model: LanguageModel, idx: torch.Tensor, state: DecodeState, logits: bool = True) -> torch.Tensor | None:
    """The logits (B, T, vocab) of (B, T) tokens fed after what each row of `state` holds (and `state` moved past them);
    without `logits` none are computed, as a prefill that echoes nothing needs no head over its prompt."""
    if isinstance(state, ContextWindow):  # the tokens appended to the rows, then each row read whole
        rows = torch.arange(idx.size(0), device=idx.device)[:, None]
        where = state.pos[:, None] + torch.arange(idx.size(1), device=idx.device)  # (B, T)
        state.ids[rows, where] = idx
        state.pos += idx.size(1)
        return model(state.ids[:, :int(state.pos.max())])[0][rows, where] if logits else None
    if not logits:
        nowhere = torch.zeros(0, dtype=torch.long, device=idx.device)
        model.logits_at(idx, nowhere, nowhere, cache=state)  # the state moves past idx; the head reads no position
        return None
    return model(idx, cache=state)[0]


def hold_weights(model: LanguageModel, dtype: torch.dtype) -> None:
    """Hold `model`'s matmul weights in `dtype`, in place, for a model loaded to decode only: autocast then casts
    nothing at every token. Norms and the residual stream stay fp32, as under autocast."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)


def live_length(longest: int, block_size: int) -> int:
    """The cache positions a step attends over when its rows hold at most `longest` tokens: the next power of two from
    64, up to the context, so a short chat in a long context reads a few hundred positions, with few distinct
    lengths."""
    return min(block_size, max(64, 1 << (longest - 1).bit_length()))


def row_bucket(rows: int, capacity: int) -> int:
    """The rows a bucketed step computes for `rows` sequences: the next power of two, up to the capacity, so a decoder
    of capacity 64 steps in 7 row shapes."""
    return min(capacity, 1 << (rows - 1).bit_length())


def step_logits(model: LanguageModel, dtype: torch.dtype, idx: torch.Tensor, state: DecodeState,
                cache_enabled: bool | None = None) -> torch.Tensor:
    """One decode step's logits (rows, vocab), under autocast to `dtype` (its `cache_enabled`): the eager step, and the
    body a graph captures or a compiler compiles."""
    with autocast(idx.device, dtype, cache_enabled):
        logits = feed(model, idx, state)
    assert logits is not None, "feed gives logits when asked"
    return logits[:, -1]


class Decoder:
    """Up to `capacity` sequences decoded together by `step` (eager unless given a compiled or bucketed one: one whose
    `bucketed` is true is made for a few shapes, a CUDA graph per shape (lmlab.inference.graphs), and is stepped over
    `row_bucket` rows, the rows past its sequences free ones emptied first, and `live_length` positions); each
    step's seconds heard by `threads`, the job's thread rule (lmlab.core.threads), where given: a load that comes or
    goes mid-decode changes the threads as it does a training run's."""

    def __init__(self, model: LanguageModel, capacity: int, dtype: torch.dtype = torch.float32,
                 step: Step | None = None, threads: Heard | None = None):
        self.model, self.dtype = model, dtype
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        state = state_dtype(held_as(model), dtype)
        self.state = model.new_cache(capacity, self.device, state) or ContextWindow(
            torch.zeros(capacity, dtype=torch.long, device=self.device),
            torch.zeros(capacity, self.block_size, dtype=torch.long, device=self.device))
        self.capacity = capacity
        self.step_fn = step or functools.partial(step_logits, model, dtype)
        self.bucketed = getattr(step, "bucketed", False)
        self.threads = threads
        self.active: list[Sequence] = []
        self._views: dict[tuple[int, int], DecodeState] = {}

    @property
    def free(self) -> int:
        return self.capacity - len(self.active)

    @torch.no_grad()
    def join(self, seq: Sequence) -> None:
        """Start decoding `seq` in the next free row; its first token comes with the next step."""
        assert self.free, "no free row: check `free` before joining"
        self.active.append(seq)
        if seq.params.temperature > 0:  # its own random stream, seeded by its own seed (greedy draws nothing)
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        prompt = seq.ids[-self.block_size:]
        logits = self._fill(len(self.active) - 1, seq, prompt, echo=seq.logprobs is not None and seq.echo)
        if seq.logprobs is not None and seq.echo:
            # Each prompt token's log-probability given the tokens before it (the first has none), from the prefill.
            seq.scores.append(TokenScore(prompt[0], None, [], []))
            if logits is not None:
                targets = torch.tensor(prompt[1:], device=logits.device)
                seq.scores += token_scores(logits[0], targets, seq.logprobs)

    def leave(self, seq: Sequence) -> None:
        """Stop decoding `seq` now; the last active row takes its place."""
        row = self.active.index(seq)
        last = self.active.pop()
        if last is not seq:
            self.state.move(len(self.active), row, last.pos)
            self.active[row] = last

    @torch.no_grad()
    def step(self) -> list[int]:
        """Feed every active sequence its newest token and append its next one; returns those tokens in `active`'s
        order."""
        for row, seq in enumerate(self.active):
            if seq.pos == self.block_size:
                # The context is full: start the window over from the newest half, re-encoded in one pass,
                # rather than recompute a whole window every token.
                self._fill(row, seq, seq.ids[-max(1, self.block_size // 2):], echo=False)
        began = time.perf_counter()  # the step's own time: a prefill's is no step's
        n = len(self.active)
        rows = row_bucket(n, self.capacity) if self.bucketed else n
        idx = torch.tensor([[seq.ids[-1]] for seq in self.active] + [[0]] * (rows - n), device=self.device)
        if rows > n:
            self.state.pos[n:rows] = 0  # a free row padding the step writes its token at position 0, in every view
        longest = max(seq.pos for seq in self.active) + 1  # with the token fed now
        logits = self.step_fn(idx, self.rows(rows, live_length(longest, self.block_size)))[:n]
        tokens = choose(logits, [seq.params for seq in self.active], [seq.generator for seq in self.active])
        self._score_step(logits, tokens)
        for seq, token in zip(self.active, tokens):
            seq.ids.append(token)
            seq.generated += 1
            seq.pos += 1
        if self.threads is not None:  # on the thread that decodes: OpenMP's thread count is each thread's own
            self.threads.stepped(time.perf_counter() - began)
        return tokens

    def rows(self, n: int, length: int | None = None) -> DecodeState:
        """The state of the first n rows, holding `length` positions each (default: the context); views made once per
        shape."""
        length = length or self.block_size
        if (n, length) not in self._views:
            self._views[n, length] = self.state.rows(0, n).shortened(length)
        return self._views[n, length]

    def _fill(self, row: int, seq: Sequence, window: list[int], echo: bool) -> torch.Tensor | None:
        """Start `row`, seq's, over holding window[:-1], prefilled in one pass; window[-1] is fed by the next step.
        Returns the prefill's logits with `echo`, else None."""
        state = self.state.rows(row, row + 1)
        state.reset(0)  # through the one-row view, which then knows it is empty (see KVCache)
        logits = None
        if len(window) > 1:
            with autocast(self.device, self.dtype):
                logits = feed(self.model, torch.tensor([window[:-1]], device=self.device), state, logits=echo)
        seq.pos = len(window) - 1
        return logits

    def _score_step(self, logits: torch.Tensor, tokens: list[int]) -> None:
        """The chosen token's log-probability (and the likeliest alternatives) for the rows that record them; where no
        row does, nothing is computed."""
        asked = {r: seq.logprobs for r, seq in enumerate(self.active) if seq.logprobs is not None}
        if not asked:
            return
        rows = list(asked)
        scored = token_scores(logits[rows], torch.tensor([tokens[r] for r in rows], device=logits.device),
                              max(asked.values()))
        for r, score in zip(rows, scored):
            self.active[r].scores.append(dataclasses.replace(score, top_ids=score.top_ids[:asked[r]],
                                                             top_logprobs=score.top_logprobs[:asked[r]]))
