"""The next-token loss and accuracy every model and evaluation shares, and the target id they skip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that adds nothing to the loss or the counts: padding, a fine-tuning prompt


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, vocab) logits against (B, T) targets in fp32; IGNORE targets are skipped, so the
    mean is over real targets only."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def next_token_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many of (B, T) targets are the argmax of their (B, T, vocab) logits, a device tensor (read without a
    sync): the count next-token accuracy divides by the targets. An IGNORE target never equals a token id."""
    return (logits.argmax(-1) == targets).sum()
