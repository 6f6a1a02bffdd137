"""The interface every model kind implements, so that training, sampling, MFU, planning and FSDP never ask
which kind they hold. A model plugin (lmlab.model.plugins) needs only `__init__(config)` and `forward`: the rest
has defaults read from its modules, which lmlab's own kinds replace with what they know."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from lmlab.core.config import ModelConfig
from lmlab.core.growth import Growth
from lmlab.model.loss import head_loss


class DecodeState:
    """What decoding carries from one step to the next for a batch of sequences (a KV cache, a hidden state): a row
    per sequence, `pos[b]` the tokens row b holds; `over(tensors)` makes a state of the same kind over plain tensors
    (views that write through, a compiled step's arguments)."""

    pos: torch.Tensor  # (B,) long

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def over(cls, tensors: Sequence[torch.Tensor]) -> DecodeState:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> DecodeState:
        """Rows start..stop-1 as a state of their own, sharing this one's memory (writes go through)."""
        return self.over([t[start:stop] for t in self.tensors()])

    def shortened(self, length: int) -> DecodeState:
        """These rows, sharing their memory, holding at most `length` tokens each (a step then attends to that many
        positions, not block_size): each tensor cut to `length` along its `length_dims` dim (by default none)."""
        dims = self.length_dims()
        return self.over([t if d is None else t.narrow(d, 0, length) for t, d in zip(self.tensors(), dims)])

    def length_dims(self) -> list[int | None]:
        """For each of `tensors()`, the dim `shortened` shortens (None: none): a compiled step takes it dynamic."""
        return [None] * len(self.tensors())

    def reset(self, row: int) -> None:
        """Empty one row for a new sequence."""
        for t in self.tensors():
            t[row] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src, which holds `length` tokens, into row dst."""
        for t in self.tensors():
            t[dst] = t[src]


class LanguageModel(nn.Module):
    """A next-token model built from a ModelConfig: `forward(idx, targets=None, cache=None) -> (logits, loss)`,
    logits (B, T, vocab) for ids (B, T), the mean loss when targets are given, `cache` from `new_cache`."""

    config: ModelConfig
    # Whether its steps may be recorded as CUDA graphs and replayed (a training step's blocks, a decode step): every
    # op capturable, none that syncs with the host or runs cuDNN's RNN. A plugin says so itself.
    graphs: bool = False
    # Which of its settings is its depth and which its width, so that `--size` and `lmlab scaling --refit` size it as
    # they size a GPT; None: it is not sized. A plugin declares it itself (lmlab's gpt grows by its own rule, its heads
    # following its width: lmlab.experiments.family).
    growth: Growth | None = None

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> DecodeState | None:
        """What decoding carries from one token to the next for `batch` rows, empty; None: the decoder feeds the
        whole context at every token."""
        return None

    def embedding_params(self) -> list[torch.Tensor]:
        """The token and position tables (by default every nn.Embedding's weight)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    def lookup_params(self) -> int:
        """Parameters used only as lookup tables, with no matmul per token: embeddings the head does not share."""
        shared = {id(p) for m in self.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(False)}
        return sum(p.numel() for p in self.embedding_params() if id(p) not in shared)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights that map hidden states to hidden states: Muon's share (the rest stays with AdamW). By
        default the 2-D parameters that are not embeddings and have no dimension as long as the vocabulary."""
        tables = {id(p) for p in self.embedding_params()}
        return [p for p in self.parameters() if p.dim() == 2 and id(p) not in tables
                and self.config.vocab_size not in p.shape]

    def shard_units(self) -> list[nn.Module]:
        """Submodules FSDP shards one by one before the root (by default none: the root is sharded whole)."""
        return []

    def describe(self) -> str:
        """The kind and shape in a few words, e.g. `gpt 4L/256 rope rmsnorm swiglu qk-norm no-bias`."""
        c = self.config
        return " ".join([f"{c.kind} {c.n_layer}L/{c.n_embd}", *(f"{k}={v}" for k, v in c.options.items())])

    def architecture(self) -> str:
        """The family in a word, for tables that have no room for `describe()`: e.g. GPT-2, modern, GRU."""
        return self.config.kind

    def logits_at(self, idx: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  cache: DecodeState | None = None) -> torch.Tensor:
        """The logits (n, vocab) of ids (B, T) at (rows[i], positions[i]) only, `cache` advanced as `forward`
        advances it: what scoring reads. By default the whole forward, then those positions."""
        logits, _ = self(idx, cache=cache)
        return logits[rows, positions]

    def use_attention(self, path: str) -> bool:
        """Run attention by `path` (one of lmlab.model.attention.PATHS) from now on; False where this kind has no
        attention of lmlab's to choose, which trains as it is."""
        return False

    def attention_flops(self) -> float:
        """Training FLOPs per token beyond the weights' (see `flops_per_token`); none unless the kind attends."""
        return 0.0

    def padding_params(self, embeddings: bool = True) -> int:
        """Weights of vocabulary padding rows (never looked up, their logits cut off), which `num_params` leaves
        out (without `embeddings`, of the head alone)."""
        return 0

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters of the real vocabulary, tied weights counted once, padding left out (as transformers counts);
        without embeddings, less the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if embeddings:
            return n - self.padding_params()
        return n - sum(p.numel() for p in self.embedding_params()) - self.padding_params(embeddings=False)

    def flops_per_token(self) -> float:
        """Training FLOPs per token, lmlab's one definition of compute (MFU, plan, compare, scaling): 6N for the N
        weights that multiply every token (lookup-only tables left out), plus the kind's `attention_flops` (a
        transformer's 12·L·H·Q·T, PaLM appendix B)."""
        # The padding rows of a tied table or a head are multiplied too: compute counts them (MFU is of the work).
        return 6.0 * (self.multiplied_params() + self.padding_params()) + self.attention_flops()

    def multiplied_params(self) -> int:
        """The weights that multiply every token, lookup-only tables left out: the N of compute and of a size fit (a
        table of pairs or positions grows no cheaper or dearer to train with the model's depth)."""
        return self.num_params() - self.lookup_params()


class HeadOverStates(LanguageModel):
    """A kind whose linear head `lm_head` reads the states (B, T, C) `hidden(idx, cache)` gives for ids (B, T),
    starting from `cache`'s state (and updating it) or from none: lmlab's own kinds."""

    lm_head: nn.Linear

    def hidden(self, idx: torch.Tensor, cache: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: Any = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T); mean cross-entropy too when targets are given (in training
        with a large vocabulary, the loss alone: lmlab.model.loss.head_loss)."""
        return head_loss(self.lm_head, self.hidden(idx, cache), targets, self.config.vocab_size, self.training)

    def logits_at(self, idx: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  cache: Any = None) -> torch.Tensor:
        """The head applied at the positions asked for only (see LanguageModel.logits_at); a padded head's extra
        columns cut off."""
        return self.lm_head(self.hidden(idx, cache)[rows, positions])[..., :self.config.vocab_size]  # (n, vocab)


def new_state(model: LanguageModel, batch: int, device: torch.device, dtype: torch.dtype) -> DecodeState:
    """`model.new_cache`, for the callers that asked first whether the model keeps a decode state."""
    state = model.new_cache(batch, device, dtype)
    assert state is not None, f"{type(model).__name__} keeps no decode state"
    return state
