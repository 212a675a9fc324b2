"""Captioner: image preprocessing + ImageEncoder + AttentionLSTMDecoder, for training and search.

Legend: B batch, S image side, k captions per image, P regions (enc_size^2), D encoder
channels, A attention, T tokens incl. start/end, L = max(lengths) - 1, V vocabulary, K beam width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from captioner.models.decoder import AttentionLSTMDecoder, DecoderState, copy_to_device
from captioner.models.encoder import ImageEncoder
from captioner.search import Hypothesis, beam_search, expand_for_beams, greedy_search

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CaptionerOutput(NamedTuple):
    logits: Tensor  # (B*k, L, V), 0 past each caption's length
    alphas: Tensor  # (B*k, L, P), 0 past each caption's length
    targets: Tensor  # (B*k, L) int64, tokens 1..L of each caption (pad past the length)
    mask: Tensor  # (B*k, L) bool, True on real target tokens


class Captioner(nn.Module):
    """Show, Attend and Tell: the encoder, the decoder and the special-token ids.

    Args:
        encoder: the image encoder; its ``encoder_dim`` must equal the decoder's.
        decoder: the attention LSTM decoder.
        pad_id, start_id, end_id: special token ids of the word map.
        image_mean, image_std: per-channel normalisation applied in :meth:`encode` (part of
            the model, so a checkpoint carries its preprocessing); not saved in state dicts.
    """

    def __init__(self, encoder: ImageEncoder, decoder: AttentionLSTMDecoder, pad_id: int,
                 start_id: int, end_id: int, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if encoder.encoder_dim != decoder.encoder_dim:
            raise ValueError(f"encoder gives D={encoder.encoder_dim} channels but the decoder "
                             f"expects encoder_dim={decoder.encoder_dim}; set "
                             f"decoder encoder_dim={encoder.encoder_dim}")
        ids = {"pad_id": pad_id, "start_id": start_id, "end_id": end_id}
        for name, value in ids.items():
            if not 0 <= value < decoder.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary 0..{decoder.vocab_size - 1}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got "
                             f"{image_mean} and {image_std}")
        self.encoder = encoder
        self.decoder = decoder
        self.pad_id = pad_id
        self.start_id = start_id
        self.end_id = end_id
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)

    def encode(self, images: Tensor) -> Tensor:
        """Normalise images on the model's device and encode them.

        Args:
            images: (B, 3, S, S) uint8 in 0..255, or float already in [0, 1].

        Returns:
            (B, P, D) region features.
        """
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        images = images.to(self.image_mean.device, non_blocking=True)  # move uint8: 4x fewer bytes
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        elif not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
        images = (images - self.image_mean) / self.image_std
        return self.encoder(images)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor) -> CaptionerOutput:
        """Teacher-forced training pass; the encoder runs once per image for its k captions.

        Equal to ``forward_features(encode(images), captions, lengths)``.

        Args:
            images: (B, 3, S, S) uint8 or float in [0, 1].
            captions: (B, k, T) int64, ``<start> .. <end> <pad>..``.
            lengths: (B, k) int64, caption lengths incl. <start>/<end>.

        Returns:
            CaptionerOutput with logits (B*k, L, V), alphas (B*k, L, P), targets (B*k, L)
            and mask (B*k, L); row b*k + j is caption j of image b.
        """
        if captions.dim() != 3 or captions.size(0) != images.size(0):
            raise ValueError(f"captions must be (B, k, T) with B={images.size(0)}, "
                             f"got {tuple(captions.shape)}")
        return self.forward_features(self.encode(images), captions, lengths)

    def forward_features(self, features: Tensor, captions: Tensor,
                         lengths: Tensor) -> CaptionerOutput:
        """Teacher-forced pass over features :meth:`encode` already computed.

        With :meth:`generate`'s ``features=``, one encoder pass serves both the loss and the
        search (validation and test).

        Args:
            features: (B, P, D) region features from :meth:`encode`.
            captions: (B, k, T) int64, ``<start> .. <end> <pad>..``.
            lengths: (B, k) int64, caption lengths incl. <start>/<end>.

        Returns:
            CaptionerOutput as :meth:`forward` returns it.
        """
        if features.dim() != 3:
            raise ValueError(f"features must be (B, P, D), got {tuple(features.shape)}")
        if captions.dim() != 3 or captions.size(0) != features.size(0):
            raise ValueError(f"captions must be (B, k, T) with B={features.size(0)}, "
                             f"got {tuple(captions.shape)}")
        if tuple(lengths.shape) != tuple(captions.shape[:2]):
            raise ValueError(f"lengths must be (B, k) = {tuple(captions.shape[:2])}, "
                             f"got {tuple(lengths.shape)}")
        batch, k, num_tokens = captions.shape
        device = self.image_mean.device
        # non_blocking copies and lengths handed to the decoder where they are (the decoder
        # reads them on the host): with a loader's CPU batch no step waits for the GPU.
        captions = captions.to(device, non_blocking=True).reshape(batch * k, num_tokens)
        lengths = lengths.reshape(batch * k)
        out = self.decoder(features, captions, lengths, captions_per_image=k)
        steps = out.logits.size(1)
        targets = captions[:, 1:steps + 1]
        lengths = lengths.to(device, non_blocking=True)
        mask = torch.arange(steps, device=device)[None] < (lengths - 1)[:, None]  # (B*k, L)
        return CaptionerOutput(out.logits, out.alphas, targets, mask)

    @torch.no_grad()
    def generate(self, images: Tensor | None = None, beam_size: int = 1, max_len: int = 50,
                 length_penalty: float = 0.0, num_return: int = 1, *,
                 features: Tensor | None = None,
                 return_alphas: bool = True) -> list[list[Hypothesis]]:
        """Caption images with greedy (beam_size=1) or beam search.

        ``<pad>`` and ``<start>`` are never generated (their logits are masked before the
        log-softmax). The caller chooses train/eval mode (use eval for dropout-free search).

        Args:
            images: (B, 3, S, S) uint8 or float in [0, 1]; or None with ``features``.
            beam_size: K; 1 runs greedy search.
            max_len: most tokens generated per caption (incl. <end>).
            length_penalty: passed to the beam search.
            num_return: hypotheses per image, best first (<= beam_size).
            features: (B, P, D) region features from :meth:`encode`, instead of ``images``
                (the encoder then does not run again).
            return_alphas: keep each hypothesis' attention rows (for attention figures);
                False leaves ``Hypothesis.alphas`` None and the search keeps no attention
                history. The tokens and scores are the same either way.

        Returns:
            B lists of ``num_return`` Hypothesis (tokens without <start>/<end>, score,
            alphas (L, P) or None, finished).
        """
        if beam_size < 1 or not 1 <= num_return <= beam_size:
            raise ValueError(f"need beam_size >= 1 and 1 <= num_return <= beam_size, got "
                             f"beam_size={beam_size}, num_return={num_return}")
        if (images is None) == (features is None):
            raise ValueError("generate takes images (B, 3, S, S) or features (B, P, D), "
                             "exactly one of them")
        if features is None:
            features = self.encode(images)
        elif features.dim() != 3:
            raise ValueError(f"features must be (B, P, D), got {tuple(features.shape)}")
        projected = self.decoder.project(features)
        state = self.decoder.init_state(features)
        batch = features.size(0)
        if beam_size > 1:
            features = expand_for_beams(features, beam_size)  # (B*K, P, D)
            projected = expand_for_beams(projected, beam_size)  # (B*K, P, A)
        # A plain copy would hold the host until the encoder has finished.
        banned = copy_to_device(torch.tensor([self.pad_id, self.start_id]), features.device)

        def step_fn(tokens: Tensor, state: DecoderState):
            out = self.decoder.step(tokens, DecoderState(*state), features, projected)
            logits = out.logits.float().index_fill_(1, banned, float("-inf"))  # a fresh tensor
            return logits.log_softmax(dim=-1), out.state, out.alpha if return_alphas else None

        if beam_size == 1:
            hyps = greedy_search(step_fn, state, batch, self.start_id, self.end_id, max_len)
            return [[hyp] for hyp in hyps]
        return beam_search(step_fn, state, batch, beam_size, self.start_id, self.end_id,
                           max_len, length_penalty=length_penalty, num_return=num_return)

    def greedy(self, images: Tensor, max_len: int = 50) -> list[list[int]]:
        """Greedy token ids per image (no <start>/<end>); a shortcut over :meth:`generate`."""
        return [hyps[0].tokens for hyps in self.generate(images, beam_size=1, max_len=max_len)]
