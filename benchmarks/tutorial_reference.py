"""Our own re-implementation of the sgrvinod tutorial's hot paths, for side-by-side timings.

This is NOT the tutorial's code: it re-implements the algorithm as the tutorial runs it, with
the same math and parameter names, so that a benchmark against ``captioner`` isolates the
engineering differences. What it keeps from the tutorial on purpose:

- training: one image per CAPTION row (the encoder runs once per caption; a batch is 32
  captions), images arrive as float tensors normalised on the CPU by the dataset, the decoder
  sorts the rows by length and shrinks the active batch each step, the attention projection
  ``encoder_att(encoder_out)`` is recomputed at every step, the loss goes through
  ``pack_padded_sequence``, gradients are clipped by value and two Adam optimisers step
  (decoder, and encoder when fine-tuning), top-5 accuracy is computed every batch;
- evaluation: beam search at batch size 1 (one image at a time), a Python loop over steps, the
  beam count ``k`` shrinking as beams emit ``<end>``, ``encoder_att`` recomputed every step.

Legend: B batch, N caption rows, P regions (enc_size^2), D encoder channels, H decoder hidden,
E embedding, A attention, T tokens incl. start/end, V vocabulary, K beam width.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TutorialEncoder(nn.Module):
    """ResNet children minus avgpool/fc, adaptive pool, output (B, enc, enc, D) channels-last view.

    Args:
        arch: torchvision resnet name (random weights: benchmarks never download).
        encoded_image_size: side of the output grid.
        last_stage: keep the trunk up to ``layer{last_stage}`` (the tutorial keeps layer4; the
            quick benchmark uses a shallower trunk for tiny images).
    """

    def __init__(self, arch: str = "resnet101", encoded_image_size: int = 14, last_stage: int = 4):
        super().__init__()
        resnet = getattr(torchvision.models, arch)(weights=None)
        modules = list(resnet.children())[:-2]
        self.resnet = nn.Sequential(*modules[:4 + last_stage])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.fine_tune(False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) float normalised -> (B, enc, enc, D)."""
        out = self.adaptive_pool(self.resnet(images))
        return out.permute(0, 2, 3, 1)  # (B, enc, enc, D)

    def fine_tune(self, fine_tune: bool = True) -> None:
        """Freeze everything, then (if ``fine_tune``) unfreeze children 5+ (layer2..layer4)."""
        for p in self.resnet.parameters():
            p.requires_grad = False
        for child in list(self.resnet.children())[5:]:
            for p in child.parameters():
                p.requires_grad = fine_tune


class TutorialAttention(nn.Module):
    """Additive attention that projects the encoder output on every call."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out: Tensor, decoder_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(N, P, D), (N, H) -> context (N, D), alpha (N, P)."""
        att1 = self.encoder_att(encoder_out)  # (N, P, A), recomputed at every step
        att2 = self.decoder_att(decoder_hidden)  # (N, A)
        att = self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2)  # (N, P)
        alpha = self.softmax(att)
        context = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (N, D)
        return context, alpha


class TutorialForward(NamedTuple):
    predictions: Tensor  # (N, L, V), rows sorted by length
    captions_sorted: Tensor  # (N, T)
    decode_lengths: list[int]
    alphas: Tensor  # (N, L, P)
    sort_ind: Tensor  # (N,)


class TutorialDecoder(nn.Module):
    """The attention LSTM decoder with the tutorial's parameter names and forward loop."""

    def __init__(self, attention_dim: int, embed_dim: int, decoder_dim: int, vocab_size: int,
                 encoder_dim: int = 2048, dropout: float = 0.5):
        super().__init__()
        self.encoder_dim, self.vocab_size = encoder_dim, vocab_size
        self.attention = TutorialAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out: Tensor) -> tuple[Tensor, Tensor]:
        mean = encoder_out.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def forward(self, encoder_out: Tensor, encoded_captions: Tensor,
                caption_lengths: Tensor) -> TutorialForward:
        """Teacher forcing over length-sorted rows with a shrinking batch.

        Args:
            encoder_out: (N, enc, enc, D), one image per caption row.
            encoded_captions: (N, T) int64.
            caption_lengths: (N, 1) int64.
        """
        batch_size = encoder_out.size(0)
        encoder_out = encoder_out.reshape(batch_size, -1, self.encoder_dim)  # (N, P, D)
        num_pixels = encoder_out.size(1)
        caption_lengths, sort_ind = caption_lengths.squeeze(1).sort(dim=0, descending=True)
        encoder_out = encoder_out[sort_ind]
        encoded_captions = encoded_captions[sort_ind]
        embeddings = self.embedding(encoded_captions)  # (N, T, E)
        h, c = self.init_hidden_state(encoder_out)
        decode_lengths = (caption_lengths - 1).tolist()
        max_len = max(decode_lengths)
        predictions = torch.zeros(batch_size, max_len, self.vocab_size, device=encoder_out.device)
        alphas = torch.zeros(batch_size, max_len, num_pixels, device=encoder_out.device)
        for t in range(max_len):
            batch_size_t = sum(length > t for length in decode_lengths)
            context, alpha = self.attention(encoder_out[:batch_size_t], h[:batch_size_t])
            gate = self.sigmoid(self.f_beta(h[:batch_size_t]))
            context = gate * context
            h, c = self.decode_step(torch.cat([embeddings[:batch_size_t, t, :], context], dim=1),
                                    (h[:batch_size_t], c[:batch_size_t]))
            preds = self.fc(self.dropout(h))
            predictions[:batch_size_t, t, :] = preds
            alphas[:batch_size_t, t, :] = alpha
        return TutorialForward(predictions, encoded_captions, decode_lengths, alphas, sort_ind)


class TutorialCaptionDataset(torch.utils.data.Dataset):
    """One item per caption row; the image is converted to float and normalised on the CPU.

    Args:
        images: (N_img, 3, S, S) uint8 array (the tutorial reads it from the HDF5 file).
        captions: (N_img * cpi, T) int64 caption rows.
        caplens: (N_img * cpi,) caption lengths incl. <start>/<end>.
        captions_per_image: cpi; row i belongs to image i // cpi.
    """

    def __init__(self, images: np.ndarray, captions: np.ndarray, caplens: np.ndarray,
                 captions_per_image: int):
        self.images, self.captions, self.caplens = images, captions, caplens
        self.cpi = captions_per_image
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        img = torch.FloatTensor(self.images[i // self.cpi] / 255.0)
        img = (img - self.mean) / self.std  # transforms.Normalize
        return img, torch.LongTensor(self.captions[i]), torch.LongTensor([self.caplens[i]])


def accuracy(scores: Tensor, targets: Tensor, k: int) -> float:
    """Top-k accuracy in percent over packed rows (computed every training batch)."""
    _, ind = scores.topk(k, 1, True, True)
    correct = ind.eq(targets.view(-1, 1).expand_as(ind))
    return correct.view(-1).float().sum().item() * (100.0 / targets.size(0))


class TutorialTrainer:
    """The tutorial's training step: encoder per caption, decoder, packed loss, clip, two Adams.

    Args:
        encoder, decoder: the tutorial modules (already on ``device``).
        fine_tune_encoder: train encoder children 5+ with its own Adam (lr ``encoder_lr``).
        device: where the step runs.
        alpha_c: weight of the doubly stochastic attention penalty.
        grad_clip: clip gradients by value at +-grad_clip (None: no clipping).
    """

    def __init__(self, encoder: TutorialEncoder, decoder: TutorialDecoder, fine_tune_encoder: bool,
                 device: torch.device, decoder_lr: float = 4e-4, encoder_lr: float = 1e-4,
                 alpha_c: float = 1.0, grad_clip: float | None = 5.0):
        self.encoder, self.decoder, self.device = encoder, decoder, device
        self.alpha_c, self.grad_clip = alpha_c, grad_clip
        encoder.fine_tune(fine_tune_encoder)
        self.decoder_optimizer = torch.optim.Adam(
            [p for p in decoder.parameters() if p.requires_grad], lr=decoder_lr)
        self.encoder_optimizer = (torch.optim.Adam(
            [p for p in encoder.parameters() if p.requires_grad], lr=encoder_lr)
            if fine_tune_encoder else None)
        self.criterion = nn.CrossEntropyLoss().to(device)

    def loss(self, imgs: Tensor, caps: Tensor, caplens: Tensor) -> tuple[Tensor, float]:
        """Forward + loss of one batch; returns (loss, top-5 accuracy)."""
        imgs, caps, caplens = imgs.to(self.device), caps.to(self.device), caplens.to(self.device)
        out = self.decoder(self.encoder(imgs), caps, caplens)
        targets = out.captions_sorted[:, 1:]
        scores = pack_padded_sequence(out.predictions, out.decode_lengths, batch_first=True).data
        targets = pack_padded_sequence(targets, out.decode_lengths, batch_first=True).data
        loss = self.criterion(scores, targets)
        loss = loss + self.alpha_c * ((1.0 - out.alphas.sum(dim=1)) ** 2).mean()
        return loss, accuracy(scores, targets, 5)

    def step(self, imgs: Tensor, caps: Tensor, caplens: Tensor) -> float:
        """One optimisation step on a batch of N caption rows (float images (N, 3, S, S))."""
        self.encoder.train()
        self.decoder.train()
        loss, _ = self.loss(imgs, caps, caplens)
        self.decoder_optimizer.zero_grad()
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.zero_grad()
        loss.backward()
        if self.grad_clip is not None:
            for optimizer in (self.decoder_optimizer, self.encoder_optimizer):
                if optimizer is None:
                    continue
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.data.clamp_(-self.grad_clip, self.grad_clip)
        self.decoder_optimizer.step()
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.step()
        return loss.item()


@torch.no_grad()
def beam_search_one(encoder: TutorialEncoder, decoder: TutorialDecoder, image: Tensor,
                    beam_size: int, start_id: int, end_id: int, max_steps: int = 50,
                    banned_ids: tuple[int, ...] = ()) -> tuple[list[int], float]:
    """The tutorial's eval beam search for ONE image (batch size 1).

    Differences from the tutorial, both opt-in or for robustness: ``banned_ids`` (empty by
    default) get ``-inf`` logits before the log-softmax, so an equivalence check can match a
    search that bans ``<pad>``/``<start>``; when no beam has finished after ``max_steps`` steps
    (where the tutorial's code would fail on an empty list), the best open beam is returned.

    Args:
        image: (1, 3, S, S) float normalised image, already on the device.
        beam_size: K.
        max_steps: most tokens emitted (the tutorial stops after 50 steps).

    Returns:
        (token ids of the best sequence without <start>, incl. <end> when finished; its score).
    """
    device = image.device
    k = beam_size
    encoder_out = encoder(image)
    encoder_out = encoder_out.reshape(1, -1, encoder_out.size(3))  # (1, P, D)
    encoder_out = encoder_out.expand(k, encoder_out.size(1), encoder_out.size(2))  # (K, P, D)
    k_prev_words = torch.full((k, 1), start_id, dtype=torch.long, device=device)
    seqs = k_prev_words
    top_k_scores = torch.zeros(k, 1, device=device)
    complete_seqs: list[list[int]] = []
    complete_seqs_scores: list[float] = []
    h, c = decoder.init_hidden_state(encoder_out)
    banned = torch.tensor(banned_ids, dtype=torch.long, device=device)
    vocab_size = decoder.vocab_size
    for step in range(1, max_steps + 1):
        embeddings = decoder.embedding(k_prev_words).squeeze(1)  # (k, E)
        context, _ = decoder.attention(encoder_out, h)
        context = decoder.sigmoid(decoder.f_beta(h)) * context
        h, c = decoder.decode_step(torch.cat([embeddings, context], dim=1), (h, c))
        scores = decoder.fc(h)
        if len(banned_ids):
            scores = scores.index_fill(1, banned, float("-inf"))
        scores = torch.log_softmax(scores, dim=1)
        scores = top_k_scores.expand_as(scores) + scores  # (k, V)
        if step == 1:
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
        prev_word_inds = torch.div(top_k_words, vocab_size, rounding_mode="floor")
        next_word_inds = top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
        incomplete = [i for i, w in enumerate(next_word_inds.tolist()) if w != end_id]
        complete = sorted(set(range(len(next_word_inds))) - set(incomplete))
        if complete:
            complete_seqs.extend(seqs[complete].tolist())
            complete_seqs_scores.extend(top_k_scores[complete].tolist())
        k -= len(complete)
        if k == 0:
            break
        seqs = seqs[incomplete]
        keep = prev_word_inds[incomplete]
        h, c, encoder_out = h[keep], c[keep], encoder_out[keep]
        top_k_scores = top_k_scores[incomplete].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete].unsqueeze(1)
    if complete_seqs:
        best = int(np.argmax(complete_seqs_scores))
        return complete_seqs[best][1:], complete_seqs_scores[best]
    best = int(top_k_scores.view(-1).argmax())
    return seqs[best].tolist()[1:], float(top_k_scores.view(-1)[best])
