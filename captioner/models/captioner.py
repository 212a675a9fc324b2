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


class SampleOutput(NamedTuple):
    tokens: Tensor  # (B*K, L) int64, the drawn tokens, <end> included, pad_id after it
    log_probs: Tensor  # (B*K, L) float32, log-prob of each drawn token (0 after <end>)
    mask: Tensor  # (B*K, L) bool, True up to and including <end>
    entropy: Tensor  # (B*K, L) float32, detached entropy of each step's distribution (0 after <end>)


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

    def sample(self, features: Tensor, num_samples: int = 5, max_len: int = 16,
               temperature: float = 1.0, greedy: bool = False) -> SampleOutput:
        """Draw ``num_samples`` captions per image by multinomial sampling, all rows at once.

        The policy of self-critical training (Rennie et al. 2017): features are computed once
        per image (:meth:`encode`) and shared by its K rows; gradients flow to the decoder and
        the features through ``log_probs``. ``<pad>`` and ``<start>`` are never drawn. The
        random numbers come from torch's global generator, so a seeded run draws the same
        captions. The caller chooses train/eval mode (dropout).

        Args:
            features: (B, P, D) region features from :meth:`encode`.
            num_samples: K captions per image; row ``b*K + j`` is sample j of image b.
            max_len: most tokens drawn per caption (incl. <end>).
            temperature: the logits are divided by it before the softmax (1 = the model).
            greedy: take the most likely token instead of sampling (the greedy baseline).

        Returns:
            SampleOutput with tokens, log_probs, mask and entropy, each (B*K, L), L <= max_len
            (the loop stops when every row has drawn <end>).
        """
        if features.dim() != 3:
            raise ValueError(f"features must be (B, P, D), got {tuple(features.shape)}")
        if num_samples < 1 or max_len < 1 or not temperature > 0:
            raise ValueError(f"need num_samples >= 1, max_len >= 1 and temperature > 0, got "
                             f"{num_samples}, {max_len}, {temperature}")
        projected = self.decoder.project(features)
        state = DecoderState(*(expand_for_beams(x, num_samples) for x in self.decoder.init_state(features)))
        features = expand_for_beams(features, num_samples)  # (B*K, P, D)
        projected = expand_for_beams(projected, num_samples)  # (B*K, P, A)
        rows = features.size(0)
        banned = copy_to_device(torch.tensor([self.pad_id, self.start_id]), features.device)
        tokens = torch.full((rows,), self.start_id, dtype=torch.long, device=features.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=features.device)
        drawn, log_probs, masks, entropies = [], [], [], []
        for _ in range(max_len):
            out = self.decoder.step(tokens, state, features, projected)
            state = out.state
            logits = out.logits.float().index_fill(1, banned, float("-inf"))
            step_log_probs = (logits / temperature).log_softmax(dim=-1)  # (B*K, V)
            with torch.no_grad():
                probs = step_log_probs.exp()
                if greedy:
                    tokens = probs.argmax(dim=-1)
                else:
                    tokens = torch.multinomial(probs, 1).squeeze(1)
                entropy = -(probs * step_log_probs.nan_to_num(neginf=0.0)).sum(dim=-1)
            alive = ~finished
            tokens = tokens.masked_fill(finished, self.pad_id)
            # Finished rows read <end>'s log-prob (finite) and then drop it.
            safe = tokens.masked_fill(finished, self.end_id)
            token_log_probs = step_log_probs.gather(1, safe[:, None]).squeeze(1)
            log_probs.append(torch.where(alive, token_log_probs, torch.zeros_like(token_log_probs)))
            entropies.append(torch.where(alive, entropy, torch.zeros_like(entropy)))
            drawn.append(tokens)
            masks.append(alive)
            finished = finished | (tokens == self.end_id)
            if bool(finished.all()):  # one host sync per step, as in self-critical.pytorch
                break
        return SampleOutput(torch.stack(drawn, dim=1), torch.stack(log_probs, dim=1),
                            torch.stack(masks, dim=1), torch.stack(entropies, dim=1))

    def greedy(self, images: Tensor, max_len: int = 50) -> list[list[int]]:
        """Greedy token ids per image (no <start>/<end>); a shortcut over :meth:`generate`."""
        return [hyps[0].tokens for hyps in self.generate(images, beam_size=1, max_len=max_len)]
