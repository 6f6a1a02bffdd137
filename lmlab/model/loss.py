"""The next-token loss and accuracy every model and evaluation shares, and the target id they skip; and the head's
loss in training, which for a large vocabulary never writes the (B, T, vocab) logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.core.cpu_caches import job_l2

IGNORE = -100  # a target that adds nothing to the loss or the counts: padding, a fine-tuning prompt
# A vocabulary above this many tokens (a BPE's) makes the logits the largest tensor of a training step (GPT-2 small:
# 50,304 logits a token beside 768 states): its loss is `ChunkedHeadLoss`'s. Below it, torch's own cross-entropy is
# faster than a loop of chunks. The same bound as the padding of large vocabularies (lmlab.model.gpt.padded_vocab).
CHUNKED_VOCAB = 1024
# The most a chunk's fp32 logits take. Each chunk reads and writes the weight gradient (V x C, fp32) once more, so a
# GPU's chunks are as large as this allows: GPT-2's micro-batch of 16 x 1,024 in four (that traffic about 2% of an
# H100's step), where the whole logits with their gradient and bf16 copies take about 10 GB. See `chunk_rows`.
CHUNK_BYTES = 2**30


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, vocab) logits against (B, T) targets in fp32, the mean over real (not IGNORE) ones."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def next_token_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many of (B, T) targets are the argmax of their (B, T, vocab) logits, a device tensor (read without a
    sync): the count next-token accuracy divides by the targets. An IGNORE target never equals a token id."""
    return (logits.argmax(-1) == targets).sum()


def chunked(vocab_size: int) -> bool:
    """Whether a head over `vocab_size` tokens trains by `ChunkedHeadLoss` (see CHUNKED_VOCAB)."""
    return vocab_size > CHUNKED_VOCAB


def head_loss(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor | None, vocab_size: int,
              training: bool, chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits (B, T, vocab_size), mean loss) of `head` over states (B, T, C) against targets (B, T), a model's
    forward. In training (`training`: the model's mode, gradients on, targets given) with a large vocabulary
    (`chunked`), the logits are never written: (None, loss), by `ChunkedHeadLoss`; a head padded past `vocab_size`
    has its padding columns masked there, never cut off; each chunk's fp32 logits at most `chunk_bytes`."""
    if targets is not None and training and torch.is_grad_enabled() and chunked(vocab_size):
        return None, ChunkedHeadLoss.apply(hidden, head.weight, targets, vocab_size, chunk_bytes)
    logits = head(hidden)[..., :vocab_size]  # (B, T, vocab_size)
    return logits, None if targets is None else next_token_loss(logits, targets)


def chunk_rows(rows: int, vocab: int, width: int, chunk_bytes: int, near: int = 0) -> int:
    """Rows of states per chunk: as few even chunks as keep each one's fp32 logits within `chunk_bytes`, or within
    `near` (the L2 caches of an eager CPU job's cores, where a chunk's ten passes then stay) where it holds `width` / 2
    rows, from which those passes, 2-3x faster in cache, pay for a chunk's extra pass over the weight gradient."""
    most = max(1, (min(chunk_bytes, near) if 2 * (near // (4 * vocab)) >= width else chunk_bytes) // (4 * vocab))
    return math.ceil(rows / math.ceil(rows / most))


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of a linear head (V, C) over states (B, T, C) against (B, T) targets, a chunk of rows at a
    time (`chunk_rows`; a compiled step's as large as `chunk_bytes`: Inductor fuses the passes). A chunk's logits give
    its loss and its gradient by them (softmax less the one-hot), which the head's two matmuls turn into its gradients
    of the states and the weight, then are dropped. Under autocast the matmuls run in its dtype, the softmax in fp32.
    A padded head's columns from `vocab` on are masked out: their weight rows get no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                chunk_bytes: int) -> torch.Tensor:
        states, wanted = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # (N, C), (N,)
        grad_states, grad_weight = torch.empty_like(states), torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=states.device)
        near = job_l2() if states.device.type == "cpu" and not torch.compiler.is_compiling() else 0
        rows = chunk_rows(states.size(0), weight.size(0), weight.size(1), chunk_bytes, near)
        for first in range(0, states.size(0), rows):
            h, y = states[first:first + rows], wanted[first:first + rows]  # (n, C), (n,)
            logits = h @ weight.t()  # (n, V)
            low, logits = logits.dtype, logits.float()  # the matmuls' dtype (autocast's), the softmax's
            logits[:, vocab:] = -math.inf
            real = (y != IGNORE).unsqueeze(1)  # (n, 1)
            picked = torch.where(real, y.unsqueeze(1), 0)  # (n, 1): a safe index where the target is IGNORE
            grad = logits.log_softmax(1)  # (n, V)
            total -= (grad.gather(1, picked) * real).sum()
            # d loss_sum by the logits, cast once (not by each matmul); IGNORE rows masked in (n, C), not in (n, V)
            grad = grad.exp_().scatter_add_(1, picked, -real.float()).to(low)
            grad_states[first:first + rows] = (grad @ weight) * real
            grad_weight += grad.t() @ (h * real)
        count = (wanted != IGNORE).sum()  # none: a nan loss, as the plain path's mean is
        ctx.save_for_backward(grad_states / count, grad_weight / count)
        ctx.shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_states, grad_weight = ctx.saved_tensors
        return ((grad_states * grad_loss).view(ctx.shape), (grad_weight * grad_loss).to(ctx.weight_dtype), None,
                None, None)
