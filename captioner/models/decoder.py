"""AttentionLSTMDecoder: the LSTM with soft attention and a gating scalar (Xu et al. 2015).

Legend: B batch (images), N caption rows (B * captions_per_image), P regions (enc_size^2),
D encoder channels, H decoder hidden, E embedding, A attention, T tokens incl. start/end,
L = max(lengths) - 1 predicted positions, V vocabulary.

Parameter names are the tutorial's ``DecoderWithAttention`` (``attention``, ``embedding``,
``dropout``, ``decode_step``, ``init_h``, ``init_c``, ``f_beta``, ``sigmoid``, ``fc``), so its
decoder state dicts load here with ``strict=True``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.attention import AdditiveAttention

log = logging.getLogger(__name__)


class DecoderState(NamedTuple):
    h: Tensor  # (N, H)
    c: Tensor  # (N, H)


class StepOutput(NamedTuple):
    logits: Tensor  # (N, V)
    state: DecoderState
    alpha: Tensor  # (N, P)


class DecoderOutput(NamedTuple):
    logits: Tensor  # (N, L, V), exactly 0 at t >= lengths[n] - 1
    alphas: Tensor  # (N, L, P), exactly 0 at t >= lengths[n] - 1


def copy_to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (a CPU tensor) on ``device`` without holding the host: on CUDA from pinned
    memory, since a ``non_blocking`` copy from pageable memory may wait for the stream (the
    driver stages it), i.e. for the work queued before it, such as the encoder."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class AttentionLSTMDecoder(nn.Module):
    """Decode captions from region features, one token at a time.

    Args:
        vocab_size: V.
        embed_dim: E, word embedding size.
        decoder_dim: H, LSTM hidden size.
        attention_dim: A, attention projection size.
        encoder_dim: D, channels of the region features.
        dropout: dropout on the hidden state before ``fc``.
        pretrained_embeddings: optional (V, E) tensor (e.g. from :func:`load_glove_embeddings`)
            copied into ``embedding.weight``.
        fine_tune_embeddings: False freezes the embedding weights.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 512, decoder_dim: int = 512,
                 attention_dim: int = 512, encoder_dim: int = 2048, dropout: float = 0.5,
                 pretrained_embeddings: Tensor | None = None, fine_tune_embeddings: bool = True):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"AttentionLSTMDecoder vocab_size={vocab_size}; must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AttentionLSTMDecoder dropout={dropout}; must be in [0, 1)")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.attention_dim = attention_dim
        self.encoder_dim = encoder_dim

        self.attention = AdditiveAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate on the context (eq. 4.2.1)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.reset_parameters()
        if pretrained_embeddings is not None:
            self.load_embeddings(pretrained_embeddings)
        self.embedding.weight.requires_grad_(fine_tune_embeddings)

    def reset_parameters(self) -> None:
        """The tutorial's init: embedding and fc weights U(-0.1, 0.1), fc bias 0."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def load_embeddings(self, embeddings: Tensor) -> None:
        """Copy a (V, E) tensor into ``embedding.weight``."""
        expected = (self.vocab_size, self.embed_dim)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"pretrained_embeddings has shape {tuple(embeddings.shape)}, "
                             f"expected (vocab_size, embed_dim) = {expected}")
        with torch.no_grad():
            self.embedding.weight.copy_(embeddings)

    # ------------------------------------------------------------------ one step
    def init_state(self, features: Tensor) -> DecoderState:
        """Initial LSTM state from the mean region feature (no tanh, as in the tutorial).

        Args:
            features: (B, P, D).

        Returns:
            DecoderState with h, c each (B, H).
        """
        mean = features.mean(dim=1)  # (B, D)
        return DecoderState(self.init_h(mean), self.init_c(mean))

    def project(self, features: Tensor) -> Tensor:
        """(B, P, D) -> (B, P, A): the attention's per-image projection, computed once."""
        return self.attention.project(features)

    def _recur(self, embedded: Tensor, state: DecoderState, features: Tensor,
               projected: Tensor) -> tuple[DecoderState, Tensor]:
        """Attention, gate and LSTM cell for one step from an embedded token (N, E), with the
        layers as the tutorial applies them: the plain path that :meth:`step` (and so beam
        search) uses, and the reference the teacher-forced pass is tested against."""
        hidden_att, hidden_gate = self.attention.decoder_att(state.h), self.f_beta(state.h)
        context, alpha = self.attention.attend(features, projected, hidden_att)
        context = self.sigmoid(hidden_gate) * context  # (N, D)
        h, c = self.decode_step(torch.cat([embedded, context], dim=1), (state.h, state.c))
        return DecoderState(h, c), alpha

    def _pass_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The weights the teacher-forced loop uses at every step, built once per pass,
        transposed for ``addmm`` and in ``dtype`` (the hidden state's: under autocast the
        casts are then done once per pass, not once per step).

        Every product of the previous hidden state, ``decoder_att(h)``, ``f_beta(h)`` and the
        LSTM's ``W_hh h + b_hh``, is one matrix product: weight (H, A + D + 4H) and bias
        (A + D + 4H,). The third is the context's part of the LSTM's input product,
        ``W_ih[:, E:]`` (D, 4H); its embedding part is applied to all steps' tokens at once,
        before the loop.
        """
        layers = (self.attention.decoder_att, self.f_beta)
        lstm = self.decode_step
        weight = torch.cat([layer.weight for layer in layers] + [lstm.weight_hh]).to(dtype)
        bias = torch.cat([layer.bias for layer in layers] + [lstm.bias_hh]).to(dtype)
        return weight.t(), bias, lstm.weight_ih[:, self.embed_dim:].to(dtype).t()

    def _teacher_forced_step(self, input_gates: Tensor, state: DecoderState, features: Tensor,
                             projected: Tensor, weights: tuple[Tensor, Tensor, Tensor]
                             ) -> tuple[DecoderState, Tensor]:
        """:meth:`_recur` given the token's part of the LSTM's input gates, ``W_ih[:, :E] x +
        b_ih`` (N, 4H), with the products regrouped as :meth:`_pass_weights` describes:
        outside the attention, two matrix products and the LSTM kernel per step instead of
        three products, a concatenation and the kernel (and fewer backward kernels and gradient
        sums to match). The same function up to float rounding; tests compare it with
        :meth:`step`."""
        hidden_weight, hidden_bias, context_weight = weights
        hidden_att, hidden_gate, hidden_gates = torch.addmm(
            hidden_bias, state.h, hidden_weight).split(
            [self.attention_dim, self.encoder_dim, 4 * self.decoder_dim], dim=1)
        context, alpha = self.attention.attend(features, projected, hidden_att)
        context = self.sigmoid(hidden_gate) * context  # (N, D)
        input_gates = torch.addmm(input_gates, context, context_weight)
        return DecoderState(*_lstm_cell(input_gates, hidden_gates, state.c)), alpha

    def step(self, tokens: Tensor, state: DecoderState, features: Tensor,
             projected: Tensor) -> StepOutput:
        """Advance the decoder by one token.

        Args:
            tokens: (N,) int64, the previous token of each row.
            state: DecoderState, h and c each (N, H).
            features: (N, P, D) region features of each row's image.
            projected: (N, P, A) from :meth:`project` on those features.

        Returns:
            StepOutput with logits (N, V), the next state, and alpha (N, P).
        """
        state, alpha = self._recur(self.embedding(tokens), state, features, projected)
        return StepOutput(self.fc(self.dropout(state.h)), state, alpha)

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor,
                captions_per_image: int = 1) -> DecoderOutput:
        """Teacher-forced decoding: feed tokens 0..len-2, predict tokens 1..len-1.

        Rows are sorted by length internally so no step computes on padding (the active
        batch shrinks as captions end); outputs come back in the caller's row order.

        Args:
            features: (B, P, D) region features.
            captions: (N, T) int64, N = B * captions_per_image; row n belongs to image
                n // captions_per_image. Each row starts with <start>.
            lengths: (N,) int64 caption lengths incl. <start>/<end>, 2 <= lengths <= T.
            captions_per_image: k, caption rows per image.

        Returns:
            DecoderOutput with logits (N, L, V) and alphas (N, L, P), L = max(lengths) - 1,
            exactly 0 at positions t >= lengths[n] - 1.
        """
        if features.dim() != 3:
            raise ValueError(f"features must be (B, P, D), got {tuple(features.shape)}")
        if captions.dim() != 2:
            raise ValueError(f"captions must be (N, T), got {tuple(captions.shape)}")
        num_rows, num_tokens = captions.shape
        if tuple(lengths.shape) != (num_rows,):
            raise ValueError(f"lengths must be (N,) = ({num_rows},), got {tuple(lengths.shape)}")
        if num_rows != features.size(0) * captions_per_image:
            raise ValueError(f"captions has {num_rows} rows but features has {features.size(0)} "
                             f"images x captions_per_image={captions_per_image}")
        # Per-step batch sizes are read on the host: free for CPU lengths (what the loader
        # gives), one host sync for lengths already on the GPU. Everything the loop needs
        # from them is built on the host and copied without waiting (non_blocking), so no
        # later line waits for the GPU either (no boolean-mask indexing).
        steps = lengths.cpu().numpy().astype(np.int64) - 1  # (N,) decoding steps per row
        if steps.min() < 1 or steps.max() > num_tokens - 1:
            raise ValueError(f"lengths must lie in 2..T={num_tokens} (<start> .. <end>), got "
                             f"min {steps.min() + 1}, max {steps.max() + 1}")
        max_steps = int(steps.max())

        # Per-image work once; the gather below makes one copy per caption row.
        projected = self.project(features)
        h, c = self.init_state(features)

        order = np.argsort(-steps, kind="stable")  # longest first
        decoding = np.arange(max_steps)[:, None] < steps[order][None, :]  # (L, N): sorted rows
        active = decoding.sum(axis=1).tolist()  # rows still decoding at each step
        # Step t's outputs are rows order[0..n_t-1] at position t: their flat places in the
        # caller's (N, L) layout, step after step (the order torch.cat(per-step outputs) has).
        step_of, rank_of = np.nonzero(decoding)
        device = captions.device
        # The image of each sorted row (row n belongs to image n // captions_per_image): one
        # gather copies the per-image tensors to the sorted caption rows. Every step's input
        # tokens, step after step, in one gather too: (sum of n_t,) flat indices into the
        # caller's (N, T) captions. The three index arrays go over in one copy.
        host = torch.from_numpy(np.concatenate([order // captions_per_image,
                                                order[rank_of] * num_tokens + step_of,
                                                order[rank_of] * max_steps + step_of]))
        image_of, inputs, places = copy_to_device(host, device).split(
            [num_rows, len(step_of), len(step_of)])
        features, projected, h, c = (x.index_select(0, image_of)
                                     for x in (features, projected, h, c))
        # One embedding lookup for all steps and the tokens' part of the LSTM's input product
        # for all of them in one matrix product (as cuDNN's LSTM does), split into the steps'
        # inputs (no per-step slicing, whose backward costs kernels at every step). In the
        # state's dtype: under autocast the loop's products are bf16/fp16, so casting once here
        # saves a cast per step.
        state = DecoderState(h, c)
        lstm = self.decode_step
        embedded = self.embedding(captions.reshape(-1).index_select(0, inputs))
        input_gates = F.linear(embedded, lstm.weight_ih[:, :self.embed_dim], lstm.bias_ih)
        input_gates = input_gates.to(h.dtype).split(active)

        hiddens, alphas = [], []
        weights = self._pass_weights(h.dtype)
        for n, step_input in zip(active, input_gates):
            # Rows are sorted, so the first n rows are the ones still decoding at this step.
            # Slice only when rows have ended: a step that keeps every row adds no slicing.
            if n < state.h.size(0):
                state = DecoderState(state.h[:n], state.c[:n])
                features, projected = features[:n], projected[:n]
            state, alpha = self._teacher_forced_step(step_input, state, features, projected,
                                                     weights)
            hiddens.append(state.h)
            alphas.append(alpha)

        # The output layer once over every real position: one large matrix product instead of
        # one per step (the V-wide layer dominates the decoder's cost), none on padding. The
        # per-step outputs are joined once (no per-step copies into a buffer, whose backward
        # costs several kernels per step) and land in place in the caller's row order.
        def placed(per_step: Tensor) -> Tensor:  # (sum of n_t, X) -> (N, L, X), 0 on padding
            out = per_step.new_zeros(num_rows * max_steps, per_step.size(1))
            return out.index_copy(0, places, per_step).view(num_rows, max_steps, -1)

        scores = self.fc(self.dropout(torch.cat(hiddens)))  # (sum of n_t, V)
        return DecoderOutput(placed(scores), placed(torch.cat(alphas)))


def _lstm_cell(input_gates: Tensor, hidden_gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell's pointwise part, ``nn.LSTMCell`` given its two gate products (biases
    included): gates i, f, g, o in that order. On CUDA PyTorch's own fused kernel (the one
    ``nn.LSTMCell`` calls there, one kernel forward and one backward); elsewhere the same
    arithmetic as ``nn.LSTMCell`` on the CPU."""
    if input_gates.is_cuda:
        h, c, _ = torch.ops.aten._thnn_fused_lstm_cell(input_gates, hidden_gates, c)
        return h, c
    # As ATen's CPU cell: in place on the chunks of a fresh tensor (unsafe_chunk's outputs are
    # not views to autograd, so this needs no copies).
    i, f, g, o = (input_gates + hidden_gates).unsafe_chunk(4, dim=1)
    i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
    c = f.mul(c).add_(i.mul(g))
    return o.mul(c.tanh()), c


def load_glove_embeddings(path: str | os.PathLike, word_to_id: dict[str, int],
                          embed_dim: int) -> Tensor:
    """Build a (V, E) embedding matrix from a GloVe-style text file.

    Each line is ``word v1 ... vE`` separated by single spaces (GloVe's format; words that
    themselves contain spaces, as in glove.840B, are handled). A word2vec-style header line
    ``count dim`` is skipped. Words missing from the file keep a U(-0.1, 0.1) init, as the
    tutorial's ``init_embedding``. The coverage is logged at INFO level.

    Args:
        path: the text file.
        word_to_id: ``{word: id}`` with ids 0..V-1 (a ``WordMap.to_dict()``).
        embed_dim: E; every vector in the file must have exactly E values.

    Returns:
        (V, E) float32 tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    vocab_size = max(word_to_id.values()) + 1
    embeddings = torch.empty(vocab_size, embed_dim).uniform_(-0.1, 0.1)
    found: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n").rstrip(" ").split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                if int(parts[1]) != embed_dim:
                    raise ValueError(f"{path}: header says dimension {parts[1]}, "
                                     f"expected embed_dim={embed_dim}")
                continue
            if parts == [""]:
                continue
            if len(parts) < embed_dim + 1 or (len(parts) > embed_dim + 1
                                               and _is_float(parts[-embed_dim - 1])):
                num_values = len(parts) - 1
                raise ValueError(f"{path}, line {line_no}: the vector has {num_values} values, "
                                 f"expected embed_dim={embed_dim}; set embed_dim to the file's "
                                 f"dimension or use the matching GloVe file")
            word = " ".join(parts[:-embed_dim])
            if word not in word_to_id or word in found:
                continue
            try:
                vector = [float(v) for v in parts[-embed_dim:]]
            except ValueError as e:
                raise ValueError(f"{path}, line {line_no}: non-numeric value ({e})") from None
            embeddings[word_to_id[word]] = torch.tensor(vector)
            found.add(word)
    log.info("embeddings %s: %d of %d words found (%.1f%%); the rest keep a random init",
             path, len(found), len(word_to_id), 100.0 * len(found) / len(word_to_id))
    return embeddings


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
