"""AdditiveAttention: soft attention over encoder regions (Xu et al. 2015, eq. 4-6).

Legend: B batch, P regions (enc_size^2), D encoder channels, H decoder hidden, A attention.

Parameter names are the tutorial's (``encoder_att``, ``decoder_att``, ``full_att``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class AttentionOutput(NamedTuple):
    context: Tensor  # (B, D) weighted sum of the region features
    alpha: Tensor  # (B, P) attention weights, >= 0, summing to 1 over P


class AdditiveAttention(nn.Module):
    """``alpha = softmax_P(full_att(relu(encoder_att(F) + decoder_att(h))))``.

    Args:
        encoder_dim: D, channels of the region features.
        decoder_dim: H, size of the decoder hidden state.
        attention_dim: A, size of the joint attention space.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def project(self, features: Tensor) -> Tensor:
        """Project the region features once per image (they do not change over time steps).

        Args:
            features: (B, P, D).

        Returns:
            (B, P, A) ``encoder_att(features)``.
        """
        return self.encoder_att(features)

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor,
                mask: Tensor | None = None) -> AttentionOutput:
        """Attend over the regions given the decoder state.

        Args:
            features: (B, P, D) region features.
            projected: (B, P, A) from :meth:`project` on the same features.
            hidden: (B, H) decoder hidden state.
            mask: optional (B, P) bool, True for regions that may be attended; masked regions
                get weight exactly 0. Each row needs at least one True.

        Returns:
            AttentionOutput with context (B, D) and alpha (B, P).
        """
        return self.attend(features, projected, self.decoder_att(hidden), mask)

    def attend(self, features: Tensor, projected: Tensor, hidden_projected: Tensor,
               mask: Tensor | None = None) -> AttentionOutput:
        """:meth:`forward` given ``decoder_att(hidden)`` (B, A), computed by the caller.

        The decoder's teacher-forced loop (``decoder._unroll``) repeats this arithmetic
        inline, with ``decoder_att(hidden)`` from one matrix product with its other projections
        of the hidden state and the ``relu`` activations kept for its own backward pass; tests
        hold it to :meth:`AttentionLSTMDecoder.step`, which calls this method.
        """
        att = self.full_att(self.relu(projected + hidden_projected[:, None])).squeeze(2)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        alpha = self.softmax(att)  # (B, P)
        # bmm, not @: matmul reaches the same kernel through expand/reshape calls (8 aten
        # calls instead of 3, and more in backward), paid at every decoder step.
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B,1,P)@(B,P,D) -> (B,D)
        return AttentionOutput(context, alpha)
