"""Greedy and batched beam search over a one-step function; knows nothing about LSTMs.

Shapes: B batch, K beam width, V vocabulary, P regions, N = B*K rows (row ``b*K + k`` is beam k
of image b), L emitted tokens of one hypothesis (including ``<end>`` when finished).

The model side is a ``step_fn(tokens (N,) int64, state) -> (log_probs (N, V), new_state,
alpha (N, P) or None)``. ``state`` is a tensor or a tree (tuple, NamedTuple, list, dict) of
tensors whose leading dim is the row; non-tensor leaves pass through unchanged. Per-image
static context (encoder features, their attention projection) is bound into ``step_fn`` by the
caller, already expanded with :func:`expand_for_beams`: the K beams of an image share it, so it
never needs reordering.

Beam semantics are the tutorial's (sgrvinod's ``caption.py``), with fixed shapes: each image owns
K slots. A beam that emits ``<end>`` is moved aside by freezing it in its slot (it extends only
with a no-op at zero cost and is never displaced); the remaining slots hold the best unfinished
beams by total log-probability. So with F finished beams, the K - F open slots take the K - F best
extensions of the open beams, exactly the tutorial's shrinking beam.

Scores and ranking: ``Hypothesis.score`` is always the raw sum of the log-probs of the emitted
tokens (``<end>`` included when finished). With ``length_penalty = lp > 0`` hypotheses are
*ranked* by ``score / ((5 + L) / 6) ** lp`` (GNMT, Wu et al. 2016, eq. 14, without the coverage
term); ``lp = 0`` ranks by raw score like the tutorial. The penalty never affects which open
beams survive a step, only the final ranking and the early-exit test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any, "Tensor | None"]]


@dataclass
class Hypothesis:
    """One decoded sequence.

    Attributes:
        tokens: emitted ids without ``<start>`` and ``<end>``.
        score: sum of the log-probs of the emitted tokens, including ``<end>`` when finished.
            This is the raw score; the length penalty (if any) is applied only for ranking, see
            :func:`ranking_score`.
        alphas: (L, P) float on the CPU, one attention row per emitted token including
            ``<end>``; None when the step function returns no attention.
        finished: True if the sequence ended with ``<end>``; False if it was cut at ``max_len``.
    """

    tokens: list[int]
    score: float
    alphas: Tensor | None
    finished: bool

    @property
    def length(self) -> int:
        """L: number of emitted tokens, ``<end>`` included when finished."""
        return len(self.tokens) + int(self.finished)


def ranking_score(score: Tensor | float, length: Tensor | int,
                  length_penalty: float = 0.0) -> Tensor | float:
    """GNMT length-normalised score ``score / ((5 + length) / 6) ** length_penalty``.

    Args:
        score: raw total log-prob(s), any shape.
        length: emitted tokens including ``<end>``, broadcastable to ``score``.
        length_penalty: 0 returns ``score`` unchanged (ranking by total log-prob).

    Returns:
        The ranking score, same shape as ``score``.
    """
    if length_penalty == 0:
        return score
    return score / ((5 + length) / 6) ** length_penalty


def expand_for_beams(x: Tensor, beam_size: int) -> Tensor:
    """Repeat every row ``beam_size`` times: (B, ...) -> (B*K, ...), row ``b*K + k`` = ``x[b]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expand_for_beams expects a Tensor, got {type(x).__name__}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    return x.repeat_interleave(beam_size, dim=0)


# ---------------------------------------------------------------------------- state trees
def _tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a (nested) tuple / NamedTuple / list / dict.

    ``torch.utils._pytree.tree_map_only(Tensor, fn, tree)`` does the same, but this runs once
    per beam step, whose host time bounds decoding on a GPU: measured on the CPU (one thread,
    CPU time, interleaved), the library's map cost 18 us a call against 7 us here, and a beam
    step with a free step function (B=1, K=5) 230 against 177 us. Validation, once per search,
    uses the library (:func:`_check_state`).
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple
        return type(tree)(*(_tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    if isinstance(tree, dict):
        return type(tree)((k, _tree_map(fn, v)) for k, v in tree.items())
    return tree


def _check_state(state: Any, batch_size: int) -> torch.device:
    """Check every tensor leaf is (B, ...); return their device (CPU if there are none)."""
    device = torch.device("cpu")
    leaves = [(f"state{pytree.keystr(path)}", leaf)  # e.g. "state.h", "state['extra']"
              for path, leaf in pytree.tree_flatten_with_path(state)[0]
              if isinstance(leaf, Tensor)]
    for i, (path, leaf) in enumerate(leaves):
        if leaf.dim() == 0 or leaf.shape[0] != batch_size:
            raise ValueError(
                f"{path} has shape {tuple(leaf.shape)}; every state tensor must be "
                f"(B={batch_size}, ...) with one row per image (beam_search expands it to B*K "
                f"itself; bind already-expanded static context inside step_fn instead)")
        if i == 0:
            device = leaf.device
    return device


def _check_args(batch_size: int, beam_size: int, max_len: int, num_return: int,
                length_penalty: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 (it counts emitted tokens incl. <end>), "
                         f"got {max_len}")
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be in 1..beam_size={beam_size}, got {num_return}")
    if not (length_penalty >= 0 and length_penalty != float("inf")):
        raise ValueError(f"length_penalty must be a finite number >= 0, got {length_penalty}")


def _call_step(step_fn: StepFn, tokens: Tensor, state: Any) -> tuple[Tensor, Any, Tensor | None]:
    out = step_fn(tokens, state)
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise ValueError("step_fn must return a 3-tuple (log_probs (N, V), new_state, "
                         "alpha (N, P) or None)")
    return out[0], out[1], out[2]


def _check_step_output(log_probs: Tensor, alpha: Tensor | None, rows: int, end_id: int) -> int:
    """Validate the first step's output; return V."""
    if not isinstance(log_probs, Tensor) or log_probs.dim() != 2 or log_probs.shape[0] != rows:
        shape = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs)
        raise ValueError(f"step_fn returned log_probs of shape {shape}; expected (N={rows}, V)")
    vocab_size = log_probs.shape[1]
    if not 0 <= end_id < vocab_size:
        raise ValueError(f"end_id={end_id} is outside the step_fn vocabulary of size {vocab_size}")
    if alpha is not None and (alpha.dim() != 2 or alpha.shape[0] != rows):
        raise ValueError(f"step_fn returned alpha of shape {tuple(alpha.shape)}; expected "
                         f"(N={rows}, P) or None")
    return vocab_size


def _check_alpha_kind(alpha: Tensor | None, first_alpha_none: bool) -> None:
    if (alpha is None) != first_alpha_none:
        raise ValueError("step_fn must return alpha on every step or on none (got a mix of "
                         "tensors and None)")


class _DoneFlag:
    """Reads the loop's "everything has stopped" flag without stalling a CUDA queue.

    On CUDA, step t's flag is copied to pinned host memory without waiting and read after step
    t + 1 has been queued, so the host never waits for the step it has just queued and the GPU
    never idles while the host queues the next one. The loop may then run one step past the
    stop; stopped rows are frozen (a zero-cost ``<end>`` no-op), so the hypotheses are the same.
    (The flag only ever turns from False to True, so a late read can delay the exit, never
    cause a wrong one.) Elsewhere the flag is read at once.
    """

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        if self.lagged:
            self.host = [torch.zeros((), dtype=torch.bool).pin_memory() for _ in range(2)]
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
            self.calls = 0

    def __call__(self, flag: Tensor) -> bool:
        if not self.lagged or flag.device.type != "cuda":
            return bool(flag)
        slot = self.calls % 2
        self.host[slot].copy_(flag, non_blocking=True)
        self.events[slot].record(torch.cuda.current_stream(flag.device))  # the copy's stream
        self.calls += 1
        if self.calls == 1:
            return False
        previous = 1 - slot
        self.events[previous].synchronize()
        return bool(self.host[previous])


def _hypotheses(tokens: Tensor, scores: Tensor, lengths: Tensor, finished: Tensor,
                alphas: Tensor | None) -> list[list[Hypothesis]]:
    """Convert decoded paths to Python objects, one host transfer for the whole batch.

    Args:
        tokens: (B, n, T) int64, each path's token at every step.
        scores: (B, n) float raw scores; ``-inf`` marks an impossible path, which is dropped.
        lengths: (B, n) int64 emitted tokens incl. ``<end>``.
        finished: (B, n) bool.
        alphas: (B, n, T, P) or None.

    Returns:
        For each image, its hypotheses in the given order.
    """
    tokens_l, scores_l = tokens.tolist(), scores.tolist()
    lengths_l, finished_l = lengths.tolist(), finished.tolist()
    alphas_cpu = alphas.cpu() if alphas is not None else None
    result = []
    for b, (row_scores, row_lengths, row_finished) in enumerate(
            zip(scores_l, lengths_l, finished_l)):
        hyps = []
        for j, (score, length, done) in enumerate(zip(row_scores, row_lengths, row_finished)):
            if score == float("-inf"):
                continue
            seq = tokens_l[b][j][:length - 1 if done else length]
            hyp_alphas = alphas_cpu[b, j, :length].clone() if alphas_cpu is not None else None
            hyps.append(Hypothesis(tokens=seq, score=score, alphas=hyp_alphas, finished=done))
        if not hyps:
            raise RuntimeError(f"image {b}: every hypothesis has score -inf; step_fn gave -inf "
                               f"log-probs to every token")
        result.append(hyps)
    return result


# ---------------------------------------------------------------------------- greedy
@torch.no_grad()
def greedy_search(step_fn: StepFn, state: Any, batch_size: int, start_id: int, end_id: int,
                  max_len: int) -> list[Hypothesis]:
    """Decode B images together, taking the most likely token at every step.

    Rows that emitted ``<end>`` stay in the batch (fed ``<end>``, outputs ignored) so shapes are
    fixed; the loop stops once every row has finished or after ``max_len`` steps. The result
    equals :func:`beam_search` with ``beam_size=1`` exactly (same arithmetic, same top-k).

    Args:
        step_fn: ``(tokens (B,) int64, state) -> (log_probs (B, V), new_state, alpha (B, P) | None)``.
        state: tensor or tree of tensors, each (B, ...).
        batch_size: B.
        start_id: token fed at the first step.
        end_id: token that finishes a sequence.
        max_len: most tokens emitted per image, ``<end>`` included.

    Returns:
        One :class:`Hypothesis` per image, in batch order.
    """
    _check_args(batch_size, 1, max_len, 1, 0.0)
    device = _check_state(state, batch_size)
    tokens = torch.full((batch_size,), start_id, dtype=torch.long, device=device)
    hist_tokens: list[Tensor] = []
    hist_alphas: list[Tensor] = []
    first_alpha_none = True
    done = _DoneFlag(device)
    for t in range(max_len):
        log_probs, state, alpha = _call_step(step_fn, tokens, state)
        if t == 0:
            _check_step_output(log_probs, alpha, batch_size, end_id)
            first_alpha_none = alpha is None
            device = log_probs.device
            scores = torch.zeros(batch_size, device=device)
            lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
            finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        _check_alpha_kind(alpha, first_alpha_none)
        # Same arithmetic as beam_search (score + log-prob, then top-1) so beam 1 == greedy.
        candidates = scores[:, None] + log_probs.float()        # (B, V)
        best_scores, best = candidates.topk(1, dim=1)
        tokens = best.squeeze(1).masked_fill(finished, end_id)
        scores = torch.where(finished, scores, best_scores.squeeze(1))
        lengths = lengths + (~finished).long()
        finished = finished | (tokens == end_id)
        hist_tokens.append(tokens)
        if alpha is not None:
            hist_alphas.append(alpha)
        if done(finished.all()):  # the loop's one host sync per step (lagged on CUDA)
            break
    path = torch.stack(hist_tokens, dim=1)[:, None]             # (B, 1, T)
    alphas = torch.stack(hist_alphas, dim=1)[:, None] if hist_alphas else None  # (B, 1, T, P)
    hyps = _hypotheses(path, scores[:, None], lengths[:, None], finished[:, None], alphas)
    return [h[0] for h in hyps]


# ---------------------------------------------------------------------------- beam
@torch.no_grad()
def beam_search(step_fn: StepFn, state: Any, batch_size: int, beam_size: int, start_id: int,
                end_id: int, max_len: int, length_penalty: float = 0.0,
                num_return: int = 1) -> list[list[Hypothesis]]:
    """Decode B images with K beams each, all B*K rows in one batch on the state's device.

    Each step scores the K*V extensions of every image with ``score + log_prob``; finished
    beams are frozen in their slots (kept, zero-cost no-op extension) and the open slots take
    the best extensions of the open beams. The state is reordered with ``index_select`` by the
    surviving beams' parents. At the first step only beam 0 is live (initial scores
    ``[0, -inf, ...]``), since all K beams of an image are identical. If V is so small that fewer
    than K sequences exist, the extra slots hold ``-inf`` placeholders that are never returned.

    An image stops (its slots freeze) when it has no open beam left, or when it has at least
    ``num_return`` finished beams and no open beam can still beat the ``num_return``-th best of
    them: log-probs are <= 0, so an open beam's descendants rank at most
    ``score / ((5 + max_len) / 6) ** length_penalty`` (just ``score`` when the penalty is 0).
    This bound is exact, so stopping early never changes the returned hypotheses. The loop ends
    when every image has stopped, or after ``max_len`` steps. There is one host sync per step
    (that test; on CUDA it reads the previous step's test, see :class:`_DoneFlag`) and none
    elsewhere in the loop.

    Args:
        step_fn: ``(tokens (N,) int64, state) -> (log_probs (N, V), new_state, alpha (N, P) |
            None)``; ``log_probs`` must be log-probabilities (<= 0) for the early exit to be exact.
        state: tensor or tree of tensors, each (B, ...); expanded here to (N, ...).
        batch_size: B.
        beam_size: K >= 1.
        start_id: token fed at the first step.
        end_id: token that finishes a sequence.
        max_len: most tokens emitted per hypothesis, ``<end>`` included.
        length_penalty: GNMT exponent for ranking (see :func:`ranking_score`); 0 = raw score.
        num_return: n, hypotheses returned per image, 1 <= n <= K.

    Returns:
        For each image, its n best hypotheses: finished ones first, then (only if fewer than n
        finished) the best unfinished ones, each group sorted by ranking score, best first.
        Never empty; shorter than n only when fewer than n sequences of length <= ``max_len``
        have finite log-probability.
    """
    _check_args(batch_size, beam_size, max_len, num_return, length_penalty)
    device = _check_state(state, batch_size)
    B, K = batch_size, beam_size
    N = B * K
    state = _tree_map(lambda x: expand_for_beams(x, K), state)
    tokens = torch.full((N,), start_id, dtype=torch.long, device=device)
    neg_inf, pos_inf = float("-inf"), float("inf")
    max_factor = ((5 + max_len) / 6) ** length_penalty
    hist_tokens: list[Tensor] = []   # (B, K) token of slot k after step t
    hist_parents: list[Tensor] = []  # (B, K) slot (before step t) that slot k extends
    hist_alphas: list[Tensor] = []   # (B, K, P) alpha of the rows before reordering
    first_alpha_none = True
    done = _DoneFlag(device)
    for t in range(max_len):
        log_probs, state, alpha = _call_step(step_fn, tokens, state)
        if t == 0:
            V = _check_step_output(log_probs, alpha, N, end_id)
            first_alpha_none = alpha is None
            device = log_probs.device
            scores = torch.full((B, K), neg_inf, device=device)
            scores[:, 0] = 0.0
            lengths = torch.zeros(B, K, dtype=torch.long, device=device)
            finished = torch.zeros(B, K, dtype=torch.bool, device=device)
            stopped = torch.zeros(B, dtype=torch.bool, device=device)
            row_offset = torch.arange(B, device=device)[:, None] * K          # (B, 1)
        _check_alpha_kind(alpha, first_alpha_none)
        frozen = finished | stopped[:, None]                                  # (B, K)
        # The ranking keys, built in place (one (B, K, V) tensor per step): a frozen slot
        # continues only through its <end> column, whose +inf key guarantees it is selected
        # again at zero cost, so finished beams are moved aside, never displaced.
        keys = scores[..., None] + log_probs.float().view(B, K, V)           # (B, K, V)
        keys.masked_fill_(frozen[..., None], neg_inf)
        keys[..., end_id].masked_fill_(frozen, pos_inf)
        flat = keys.view(B, K * V).topk(K, dim=1).indices                     # (B, K)
        parents = torch.div(flat, V, rounding_mode="floor")
        new_tokens = flat % V
        parent_frozen = frozen.gather(1, parents)
        # Open extensions score their key; a frozen slot's no-op keeps its parent's score.
        scores = torch.where(parent_frozen & (new_tokens == end_id), scores.gather(1, parents),
                             keys.view(B, K * V).gather(1, flat))
        finished = torch.where(parent_frozen, finished.gather(1, parents), new_tokens == end_id)
        finished = finished & (scores > neg_inf)
        lengths = lengths.gather(1, parents) + (~parent_frozen).long()
        rows = (parents + row_offset).view(N)                                 # (N,)
        state = _tree_map(lambda x: x.index_select(0, rows), state)
        tokens = new_tokens.view(N)
        hist_tokens.append(new_tokens)
        hist_parents.append(parents)
        if alpha is not None:
            hist_alphas.append(alpha.view(B, K, -1))
        stopped = stopped | _images_done(scores, lengths, finished, num_return, length_penalty,
                                         max_factor)
        if done(stopped.all()):  # the loop's one host sync per step (lagged on CUDA)
            break

    # Rank: finished first, then unfinished, each by ranking score (two stable sorts).
    rank = ranking_score(scores, lengths, length_penalty)
    order = torch.sort(rank, dim=1, descending=True, stable=True).indices     # (B, K)
    by_finished = torch.sort(finished.gather(1, order).to(torch.int8), dim=1, descending=True,
                             stable=True).indices
    order = order.gather(1, by_finished)[:, :num_return]                       # (B, n)

    # Backtrack the chosen slots through the parent pointers.
    steps, n = len(hist_tokens), num_return
    path = torch.empty(B, n, steps, dtype=torch.long, device=device)
    path_alphas = (torch.empty(B, n, steps, hist_alphas[0].shape[-1], device=device,
                               dtype=hist_alphas[0].dtype) if hist_alphas else None)
    slot = order
    for t in range(steps - 1, -1, -1):
        path[:, :, t] = hist_tokens[t].gather(1, slot)
        parent = hist_parents[t].gather(1, slot)
        if path_alphas is not None:
            P = hist_alphas[t].shape[-1]
            path_alphas[:, :, t] = hist_alphas[t].gather(1, parent[..., None].expand(B, n, P))
        slot = parent
    return _hypotheses(path, scores.gather(1, order), lengths.gather(1, order),
                       finished.gather(1, order), path_alphas)


def _images_done(scores: Tensor, lengths: Tensor, finished: Tensor, num_return: int,
                 length_penalty: float, max_factor: float) -> Tensor:
    """(B,) bool: images whose n best finished hypotheses can no longer change.

    Args:
        scores, lengths, finished: (B, K) slot bookkeeping.
        max_factor: ``((5 + max_len) / 6) ** length_penalty``.
    """
    open_beams = ~finished & (scores > float("-inf"))                          # (B, K)
    finished_rank = ranking_score(scores, lengths, length_penalty).masked_fill(
        ~finished, float("-inf"))
    nth_best = finished_rank.topk(num_return, dim=1).values[:, -1]           # (B,)
    best_possible = (scores / max_factor).masked_fill(~open_beams, float("-inf")).amax(dim=1)
    return ~open_beams.any(dim=1) | (best_possible < nth_best)
