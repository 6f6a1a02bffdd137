"""The next-token loss and accuracy every model and evaluation shares, and the target id they skip; and the head's
loss in training, which for a large vocabulary never writes the (B, T, vocab) logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that adds nothing to the loss or the counts: padding, a fine-tuning prompt
# A vocabulary above this many tokens (a BPE's, tens of thousands) makes the logits the largest tensor of a training
# step, several times the states they are computed from (GPT-2 small: 50,304 logits a token beside 768 states): its
# loss is computed by `ChunkedHeadLoss`. Below it (a character-level or small BPE vocabulary), the logits cost no more
# than an activation or two, and torch's own cross-entropy kernels are faster than a loop of chunks. The same bound
# as the padding of large vocabularies (lmlab.model.gpt.padded_vocab).
CHUNKED_VOCAB = 1024
# The most a chunk's fp32 logits take. Each chunk reads and writes the head's weight gradient (V x C, fp32) once
# more, so chunks are made as large as this allows: for GPT-2's vocabulary at most 5,336 rows, a micro-batch of
# 16 x 1,024 in four chunks (the weight gradient's traffic about 2% of an H100's step by its bandwidth), where the
# whole logits with their gradient and bf16 copies take about 10 GB; smaller chunks would save memory that is small
# beside the activations by then, and cost a pass over the weight gradient each.
CHUNK_BYTES = 2**30


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, vocab) logits against (B, T) targets in fp32; IGNORE targets are skipped, so the
    mean is over real targets only."""
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


def chunk_rows(rows: int, vocab: int, chunk_bytes: int) -> int:
    """Rows of states per chunk: as few even chunks as keep each one's fp32 logits within `chunk_bytes`."""
    return math.ceil(rows / math.ceil(rows * vocab * 4 / chunk_bytes))


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of a linear head (V, C) over states (B, T, C) against (B, T) targets, one chunk of rows at a
    time (`chunk_rows`, each chunk's fp32 logits at most `chunk_bytes`). Each chunk's logits give its loss and, at
    once, the gradient of the loss by them (softmax less the target's one-hot, over the real targets), which the
    head's two matmuls turn into the chunk's gradients of the states and of the weight; the logits are then dropped.
    So the backward only scales the two gradients it kept, (B, T, C) and (V, C), and the step computes what the plain
    path does with the same FLOPs. Under autocast the head's matmuls run in its dtype and the softmax in fp32, as the
    plain path runs them. Columns from `vocab` on (a padded head's) are masked out of the softmax, so their weight rows
    get no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                chunk_bytes: int) -> torch.Tensor:
        states, wanted = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # (N, C), (N,)
        grad_states = torch.empty_like(states)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=states.device)
        rows = chunk_rows(states.size(0), weight.size(0), chunk_bytes)
        for first in range(0, states.size(0), rows):
            h, y = states[first:first + rows], wanted[first:first + rows]  # (n, C), (n,)
            logits = (h @ weight.t()).float()  # (n, V)
            logits[:, vocab:] = -math.inf
            real = (y != IGNORE).unsqueeze(1)  # (n, 1)
            picked = torch.where(real, y.unsqueeze(1), 0)  # (n, 1): a safe index where the target is IGNORE
            norm = logits.logsumexp(1, keepdim=True)  # (n, 1)
            total += ((norm - logits.gather(1, picked)) * real).sum()
            grad = logits.sub_(norm).exp_().scatter_add_(1, picked, -real.float()).mul_(real)  # (n, V): d loss_sum
            grad_states[first:first + rows] = grad @ weight
            grad_weight += grad.t() @ h
        count = (wanted != IGNORE).sum()  # none: a nan loss, as the plain path's mean is
        ctx.save_for_backward(grad_states / count, grad_weight / count)
        ctx.shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_states, grad_weight = ctx.saved_tensors
        return ((grad_states * grad_loss).view(ctx.shape), (grad_weight * grad_loss).to(ctx.weight_dtype), None,
                None, None)
