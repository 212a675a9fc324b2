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

    def _pass_weights(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The weights the teacher-forced loop uses at every step, built once per pass,
        transposed for ``addmm`` and in ``dtype`` (the hidden state's: under autocast the
        casts are then done once per pass, not once per step).

        Every product of the previous hidden state, ``decoder_att(h)``, ``f_beta(h)`` and the
        LSTM's ``W_hh h + b_hh``, is one matrix product: weight (H, A + D + 4H) and bias
        (A + D + 4H,). The third is the context's part of the LSTM's input product,
        ``W_ih[:, E:]`` (D, 4H); its embedding part is applied to all steps' tokens at once,
        before the loop. Last, the attention's ``full_att`` weight (1, A) and bias (1,).
        """
        layers = (self.attention.decoder_att, self.f_beta)
        lstm = self.decode_step
        weight = torch.cat([layer.weight for layer in layers] + [lstm.weight_hh]).to(dtype)
        bias = torch.cat([layer.bias for layer in layers] + [lstm.bias_hh]).to(dtype)
        full_att = self.attention.full_att
        return (weight.t(), bias, lstm.weight_ih[:, self.embed_dim:].to(dtype).t(),
                full_att.weight.to(dtype), full_att.bias.to(dtype))

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
        # caller's (N, T) captions. Then the outputs' places in the caller's (N, L) layout and
        # in the sorted rows' (N, L) layout (for the features' gradient). The index arrays go
        # over in one copy.
        host = torch.from_numpy(np.concatenate([order // captions_per_image,
                                                order[rank_of] * num_tokens + step_of,
                                                order[rank_of] * max_steps + step_of,
                                                rank_of * max_steps + step_of]))
        image_of, inputs, places, sorted_places = copy_to_device(host, device).split(
            [num_rows, len(step_of), len(step_of), len(step_of)])
        features, projected, h, c = (x.index_select(0, image_of)
                                     for x in (features, projected, h, c))
        # One embedding lookup for all steps and the tokens' part of the LSTM's input product
        # for all of them in one matrix product (as cuDNN's LSTM does). In the state's dtype:
        # under autocast the loop's products are bf16/fp16, so casting once here saves a cast
        # per step.
        lstm = self.decode_step
        embedded = self.embedding(captions.reshape(-1).index_select(0, inputs))
        input_gates = F.linear(embedded, lstm.weight_ih[:, :self.embed_dim], lstm.bias_ih)
        # The features too: under autocast the attention's bmm would cast fp32 features at
        # every step (the encoder's features are bf16 there already, so this is usually none).
        loop_inputs = (input_gates.to(h.dtype), h, c, features.to(h.dtype), projected,
                       *self._pass_weights(h.dtype))
        if torch.is_grad_enabled() and any(x.requires_grad for x in loop_inputs):
            hiddens, alphas = _TeacherForcedLoop.apply(active, sorted_places, *loop_inputs)
        else:
            hiddens, alphas = _unroll(active, *loop_inputs)[:2]

        # The output layer once over every real position: one large matrix product instead of
        # one per step (the V-wide layer dominates the decoder's cost), none on padding. The
        # per-step outputs land in place in the caller's row order.
        def placed(per_step: Tensor) -> Tensor:  # (sum of n_t, X) -> (N, L, X), 0 on padding
            out = per_step.new_zeros(num_rows * max_steps, per_step.size(1))
            return out.index_copy(0, places, per_step).view(num_rows, max_steps, -1)

        scores = self.fc(self.dropout(hiddens))  # (sum of n_t, V)
        return DecoderOutput(placed(scores), placed(alphas))


class _Saved(NamedTuple):
    """What one teacher-forced step keeps for its backward pass (n rows decoding)."""
    h: Tensor  # (n, H) the state it started from
    c: Tensor  # (n, H)
    c_next: Tensor  # (n, H) the cell state it computed
    workspace: Tensor  # (n, 4H) the LSTM's activated gates i|f|g|o
    features: Tensor  # (n, P, D)
    gate: Tensor  # (n, D) sigmoid(f_beta(h))
    context: Tensor  # (n, D) before the gate
    gated: Tensor  # (n, D) gate * context, the LSTM's input besides the token


def _unroll(active: list[int], input_gates: Tensor, h: Tensor, c: Tensor, features: Tensor,
            projected: Tensor, hidden_weight: Tensor, hidden_bias: Tensor,
            context_weight: Tensor, score_weight: Tensor, score_bias: Tensor,
            save: bool = False) -> tuple[Tensor, Tensor, list[_Saved], Tensor | None]:
    """The teacher-forced loop over sorted rows, ``active[t]`` of them decoding at step t: the
    arithmetic of :meth:`AttentionLSTMDecoder._recur` (attention, gate, LSTM cell) with the
    products regrouped as :meth:`AttentionLSTMDecoder._pass_weights` describes: per step two
    matrix products and the LSTM kernel outside the attention, instead of three products, a
    concatenation and the kernel. The same function up to float rounding; tests compare it
    with :meth:`AttentionLSTMDecoder.step`.

    Args:
        active: rows decoding at each step, non-increasing; rows are sorted longest first, so
            the first ``active[t]`` rows are the ones decoding at step t.
        input_gates: (sum of n_t, 4H) the tokens' part of the LSTM's input gates, ``W_ih[:, :E]
            x + b_ih``, step after step.
        h, c: (N, H) initial state; features (N, P, D), projected (N, P, A) per sorted row.
        hidden_weight, hidden_bias, context_weight, score_weight, score_bias: as
            ``_pass_weights`` gives them.
        save: keep what :class:`_TeacherForcedLoop` needs for its backward pass.

    Returns:
        hiddens (sum of n_t, H), alphas (sum of n_t, P), the per-step saved tensors, and the
        attention's ``relu`` outputs (sum of n_t, P, A) (both only with ``save``).
    """
    attention_dim, encoder_dim = projected.size(2), features.size(2)
    splits = [attention_dim, encoder_dim, hidden_weight.size(1) - attention_dim - encoder_dim]
    # With ``save`` each step's attention activations are written into one tensor for all
    # steps, so the backward pass gets full_att's weight gradient from one product.
    activations = projected.new_empty(sum(active), *projected.shape[1:]) if save else None
    outs = activations.split(active) if save else [None] * len(active)
    hiddens, alphas, saved = [], [], []
    for n, step_input, out in zip(active, input_gates.split(active), outs):
        # Slice only when rows have ended: a step that keeps every row adds no slicing.
        if n < h.size(0):
            h, c, features, projected = h[:n], c[:n], features[:n], projected[:n]
        hidden_att, hidden_gate, hidden_gates = torch.addmm(hidden_bias, h, hidden_weight).split(
            splits, dim=1)
        activation = torch.add(projected, hidden_att[:, None], out=out).relu_()  # (n, P, A)
        alpha = F.softmax(F.linear(activation, score_weight, score_bias).squeeze(2), dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (n, D)
        gate = torch.sigmoid(hidden_gate)
        gated = gate * context
        h_next, c_next, workspace = _lstm_cell(torch.addmm(step_input, gated, context_weight),
                                               hidden_gates, c)
        if save:
            saved.append(_Saved(h, c, c_next, workspace, features, gate, context, gated))
        h, c = h_next, c_next
        hiddens.append(h)
        alphas.append(alpha)
    return torch.cat(hiddens), torch.cat(alphas), saved, activations


class _TeacherForcedLoop(torch.autograd.Function):
    """:func:`_unroll` with a backward pass written for it, in place of autograd's.

    A training step on one GPU is bound by the host's calls (docs/performance.md). Autograd's
    backward of the loop makes 45 ATen calls per decoder step (25 of them kernels), with a
    product, a transpose and a sum for each weight's gradient at every step, and its engine
    walks about a dozen nodes per step. This backward runs the loop in reverse carrying only
    the gradients of the state and the attention: 19 calls per step (15 kernels; the fused
    LSTM backward on CUDA). Every weight's gradient then comes from one product over all
    steps. Gradients equal autograd's up to float rounding (tests compare them with feeding
    :meth:`AttentionLSTMDecoder.step` token by token); no double backward.
    """

    @staticmethod
    def forward(ctx, active: list[int], sorted_places: Tensor, *inputs: Tensor):
        hiddens, alphas, saved, activations = _unroll(active, *inputs, save=True)
        ctx.active, ctx.steps, ctx.activations = active, saved, activations
        ctx.save_for_backward(sorted_places, *inputs[4:], alphas)
        return hiddens, alphas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hiddens: Tensor | None, grad_alphas: Tensor | None):
        (sorted_places, projected, hidden_weight, _, context_weight, score_weight, _,
         alphas) = ctx.saved_tensors
        active, steps, activations = ctx.active, ctx.steps, ctx.activations
        needs = ctx.needs_input_grad[2:]  # input_gates, h, c, features, projected, weights...
        first = steps[0]
        rows, regions, encoder_dim = first.features.shape  # every row decodes at step 0
        hidden_dim = first.h.size(1)
        with torch.autocast(first.h.device.type, enabled=False):
            if grad_hiddens is None:
                grad_hiddens = first.h.new_zeros(sum(active), hidden_dim)
            grad_hiddens = grad_hiddens.split(active)
            grad_alphas = None if grad_alphas is None else grad_alphas.split(active)
            step_alphas, step_activations = alphas.split(active), activations.split(active)
            # The gradients flowing into the state of the step below, for its rows (the first
            # ones), as it computes them; zero rows are added only where rows have ended.
            grad_h, grad_c = None, first.c.new_zeros(active[-1], hidden_dim)
            grad_projected = torch.zeros_like(projected) if needs[4] else None
            grad_projected_rows = None
            hidden_weight_t, context_weight_t = hidden_weight.t(), context_weight.t()
            grad_scores, grad_contexts, grad_products = [], [], []
            for t in reversed(range(len(active))):
                n, step, alpha = active[t], steps[t], step_alphas[t]
                if grad_h is None:  # the last step: nothing flows back into its state
                    grad_h = grad_hiddens[t]
                else:
                    if grad_h.size(0) < n:  # rows that ended at step t + 1
                        grad_h, grad_c = (F.pad(x, (0, 0, 0, n - x.size(0)))
                                          for x in (grad_h, grad_c))
                    grad_h = grad_hiddens[t] + grad_h
                grad_gates, grad_c = _lstm_cell_backward(grad_h, grad_c, step.c, step.c_next,
                                                         step.workspace)  # (n, 4H), (n, H)
                grad_gated = torch.mm(grad_gates, context_weight_t)  # (n, D)
                grad_context = grad_gated * step.gate
                grad_gate = torch.ops.aten.sigmoid_backward(grad_gated * step.context, step.gate)
                grad_alpha = torch.bmm(grad_context.unsqueeze(1), step.features.transpose(1, 2)
                                       ).squeeze(1)
                grad_alpha = grad_alpha.to(alpha.dtype)  # (n, P)
                if grad_alphas is not None:
                    grad_alpha = grad_alpha + grad_alphas[t]
                grad_score = torch._softmax_backward_data(grad_alpha, alpha, 1, alpha.dtype).to(
                    score_weight.dtype)  # (n, P)
                grad_activation = torch.ops.aten.threshold_backward(
                    grad_score.unsqueeze(2) * score_weight, step_activations[t], 0)  # (n, P, A)
                if grad_projected is not None:
                    if grad_projected_rows is None or grad_projected_rows.size(0) != n:
                        grad_projected_rows = grad_projected[:n]
                    grad_projected_rows.add_(grad_activation)
                grad_product = torch.cat([grad_activation.sum(1), grad_gate, grad_gates], dim=1)
                grad_h = torch.mm(grad_product, hidden_weight_t)  # (n, H)
                grad_scores.append(grad_score)
                grad_contexts.append(grad_context)
                grad_products.append(grad_product)

            # Every weight's gradient in one product over all steps (in step order).
            grad_product = torch.cat(grad_products[::-1])  # (sum of n_t, A + D + 4H)
            grad_input_gates = grad_product[:, -4 * hidden_dim:]
            grad_score = torch.cat(grad_scores[::-1])  # (sum of n_t, P)
            grads = [grad_input_gates, grad_h, grad_c, None, grad_projected, None, None, None,
                     None, None]
            if needs[3]:  # the features: sum over steps of alpha^T grad_context, per row
                max_steps = len(active)
                dtype = first.features.dtype
                padded_alphas = alphas.new_zeros(rows * max_steps, regions, dtype=dtype)
                padded_alphas.index_copy_(0, sorted_places, alphas.to(dtype))
                padded_contexts = alphas.new_zeros(rows * max_steps, encoder_dim, dtype=dtype)
                padded_contexts.index_copy_(0, sorted_places, torch.cat(grad_contexts[::-1]))
                grads[3] = torch.bmm(padded_alphas.view(rows, max_steps, regions).transpose(1, 2),
                                     padded_contexts.view(rows, max_steps, encoder_dim))
            if needs[5] or needs[6]:
                h_in = torch.cat([step.h for step in steps])
                grads[5] = torch.mm(h_in.t(), grad_product)
                grads[6] = grad_product.sum(0)
            if needs[7]:
                grads[7] = torch.mm(torch.cat([step.gated for step in steps]).t(),
                                    grad_input_gates)
            if needs[8] or needs[9]:
                grads[8] = torch.mm(grad_score.view(1, -1),
                                    activations.view(-1, activations.size(2)))
                grads[9] = grad_score.sum().view(1)
        return (None, None, *grads)


def _fused_lstm(x: Tensor) -> bool:
    """Whether the LSTM cell runs PyTorch's fused kernels on ``x``'s device (CUDA-only).
    ``benchmarks.calls`` makes it true on the CPU to count the CUDA path's calls, with CPU
    stand-ins for the two kernels."""
    return x.is_cuda


def _lstm_cell(input_gates: Tensor, hidden_gates: Tensor, c: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM cell's pointwise part, ``nn.LSTMCell`` given its two gate products (biases
    included): gates i, f, g, o in that order. Returns h, c and the activated gates (the
    backward pass's workspace). On CUDA PyTorch's own fused kernel (the one ``nn.LSTMCell``
    calls there); elsewhere the same arithmetic as ``nn.LSTMCell`` on the CPU."""
    if _fused_lstm(input_gates):
        return torch.ops.aten._thnn_fused_lstm_cell(input_gates, hidden_gates, c)
    return _lstm_cell_arithmetic(input_gates, hidden_gates, c)


def _lstm_cell_arithmetic(input_gates: Tensor, hidden_gates: Tensor, c: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_lstm_cell` as ATen's CPU cell computes it: in place on the chunks of a fresh
    tensor, which ends up holding the activated gates (the CUDA kernel's workspace)."""
    gates = input_gates + hidden_gates
    i, f, g, o = gates.unsafe_chunk(4, dim=1)
    i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
    c = f.mul(c).add_(i.mul(g))
    return o.mul(c.tanh()), c, gates


def _lstm_cell_backward(grad_h: Tensor, grad_c: Tensor, c: Tensor, c_next: Tensor,
                        workspace: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`_lstm_cell`'s gate inputs (n, 4H) and of its cell state c
    (n, H), given those of its outputs h and c_next. On CUDA PyTorch's fused backward kernel
    (the one ``nn.LSTMCell``'s backward calls there)."""
    if _fused_lstm(c):
        grad_gates, grad_c, _ = torch.ops.aten._thnn_fused_lstm_cell_backward_impl(
            grad_h, grad_c, c, c_next, workspace, False)
        return grad_gates, grad_c
    return _lstm_cell_backward_arithmetic(grad_h, grad_c, c, c_next, workspace)


def _lstm_cell_backward_arithmetic(grad_h: Tensor, grad_c: Tensor, c: Tensor, c_next: Tensor,
                                   workspace: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_lstm_cell_backward` in ATen's pointwise backward ops (what the CUDA kernel
    computes): gates i, f, g, o activated in ``workspace``."""
    aten = torch.ops.aten
    i, f, g, o = workspace.unsafe_chunk(4, dim=1)
    tanh_c = c_next.tanh()
    grad_c = aten.tanh_backward(grad_h * o, tanh_c).add_(grad_c)
    grad_gates = torch.cat([aten.sigmoid_backward(grad_c * g, i),
                            aten.sigmoid_backward(grad_c * c, f),
                            aten.tanh_backward(grad_c * i, g),
                            aten.sigmoid_backward(grad_h * tanh_c, o)], dim=1)
    return grad_gates, grad_c * f


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
