"""caption_loss: masked cross-entropy and the doubly stochastic attention penalty."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.losses import caption_loss


def test_loss_equals_a_hand_computation():
    # Two rows, L=2, V=2, P=2; row 1 has one real token, its second position is padding.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]],
                           [[0.0, math.log(4.0)], [0.0, 0.0]]])
    targets = torch.tensor([[1, 0], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    alphas = torch.tensor([[[0.5, 0.5], [1.0, 0.0]],
                           [[0.2, 0.8], [0.0, 0.0]]])
    out = caption_loss(logits, targets, mask, alphas, alpha_c=2.0)
    # -log p: row0 t0 log 2, row0 t1 -log(3/4), row1 t0 -log(4/5); mean over the 3 real tokens.
    ce = (math.log(2.0) - math.log(0.75) - math.log(0.8)) / 3
    # Region sums over time: row0 (1.5, 0.5), row1 (0.2, 0.8) -> (1 - s)^2 averaged over 4.
    penalty = (0.25 + 0.25 + 0.64 + 0.04) / 4
    torch.testing.assert_close(out.cross_entropy, torch.tensor(ce))
    torch.testing.assert_close(out.attention_penalty, torch.tensor(penalty))
    torch.testing.assert_close(out.loss, torch.tensor(ce + 2.0 * penalty))


def test_padding_positions_do_not_affect_the_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    alphas = torch.rand(3, 4, 2)
    base = caption_loss(logits, targets, mask, alphas)
    noisy = logits.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 5) * 10
    other_targets = torch.where(mask, targets, (targets + 1) % 5)
    changed = caption_loss(noisy, other_targets, mask, alphas)
    torch.testing.assert_close(changed.cross_entropy, base.cross_entropy)
    flat = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(base.cross_entropy, flat)


def test_gradient_flows_only_through_real_tokens():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    caption_loss(logits, torch.zeros(2, 3, dtype=torch.long), mask, torch.rand(2, 3, 5)).loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(-1) > 0).all()


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mask must be \(N, L\)"):
        caption_loss(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                     torch.ones(2, 4, dtype=torch.bool), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="alphas must be"):
        caption_loss(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                     torch.ones(2, 3, dtype=torch.bool), torch.rand(2, 5))
