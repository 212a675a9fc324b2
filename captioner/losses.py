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


def new_self_critical_baseline(rewards: Tensor) -> Tensor:
    """Each sample's baseline is the mean reward of the other K-1 samples of its image
    (Luo 2020, self-critical.pytorch's ``new_self_critical``).

    Args:
        rewards: (B, K) float, K >= 2 samples per image.

    Returns:
        (B, K) float baselines.
    """
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be (B, K) with K >= 2 samples per image, got {tuple(rewards.shape)}")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (rewards.size(1) - 1)


def self_critical_loss(log_probs: Tensor, mask: Tensor, advantage: Tensor) -> Tensor:
    """REINFORCE with a baseline (Rennie et al. 2017): ``-(reward - baseline) * log p(token)``
    summed over each sample's tokens up to and including ``<end>``, then divided by the number
    of those tokens in the batch (self-critical.pytorch's ``RewardCriterion`` averaging).

    Args:
        log_probs: (N, L) float, log-prob of each sampled token.
        mask: (N, L) bool, True on the sampled tokens (through <end>).
        advantage: (N,) float, reward minus baseline per sample (no gradient).

    Returns:
        Scalar loss.
    """
    if mask.shape != log_probs.shape or advantage.shape != log_probs.shape[:1]:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and mask {tuple(mask.shape)} must be "
                         f"(N, L) and advantage {tuple(advantage.shape)} (N,)")
    mask = mask.to(log_probs.dtype)
    return -(advantage.detach()[:, None] * log_probs * mask).sum() / mask.sum().clamp(min=1)
