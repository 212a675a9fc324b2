"""Training loss: masked token cross-entropy + the doubly stochastic attention penalty.

Legend: N caption rows, L predicted positions, V vocabulary, P regions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, cross_entropy + alpha_c * attention_penalty
    cross_entropy: Tensor  # scalar, mean over real (unmasked) tokens
    attention_penalty: Tensor  # scalar, before the alpha_c factor


def caption_loss(logits: Tensor, targets: Tensor, mask: Tensor, alphas: Tensor,
                 alpha_c: float = 1.0) -> LossOutput:
    """The Show, Attend and Tell objective (Xu et al. 2015, eq. 14).

    The cross-entropy is averaged over real tokens only (as the tutorial's packed sequence
    does). The penalty is ``((1 - alphas.sum(1)) ** 2).mean()``: each region's attention summed
    over ALL L positions (zeros past a caption's length, as in the tutorial), then averaged
    over rows and regions.

    Args:
        logits: (N, L, V) unnormalised scores.
        targets: (N, L) int64 target ids (any valid id where ``mask`` is False).
        mask: (N, L) bool, True on real tokens.
        alphas: (N, L, P) attention weights.
        alpha_c: weight of the attention penalty.

    Returns:
        LossOutput(loss, cross_entropy, attention_penalty), each a scalar tensor.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, L, V), got {tuple(logits.shape)}")
    rows_steps = tuple(logits.shape[:2])
    for name, value in (("targets", targets), ("mask", mask)):
        if tuple(value.shape) != rows_steps:
            raise ValueError(f"{name} must be (N, L) = {rows_steps}, got {tuple(value.shape)}")
    if alphas.dim() != 3 or tuple(alphas.shape[:2]) != rows_steps:
        raise ValueError(f"alphas must be (N, L, P) with (N, L) = {rows_steps}, "
                         f"got {tuple(alphas.shape)}")
    # Per-token loss then a masked mean: no boolean indexing, so no host sync on GPU.
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (N, L)
    weights = mask.to(token_loss.dtype)
    cross_entropy = (token_loss * weights).sum() / weights.sum().clamp(min=1.0)
    attention_penalty = ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    return LossOutput(cross_entropy + alpha_c * attention_penalty, cross_entropy,
                      attention_penalty)
