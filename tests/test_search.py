"""Greedy and batched beam search against a plain per-image reference beam search.

The toy step function has a path-dependent state (a running hash and sum of the emitted tokens)
that changes the next log-probs, so results only match the reference when beam_search reorders
the state by the right parents.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from captioner.search import (
    Hypothesis,
    beam_search,
    expand_for_beams,
    greedy_search,
    ranking_score,
)

V, P, NUM_HASH = 8, 5, 7
START, END = 6, 7


class ToyState(NamedTuple):
    path_hash: Tensor  # (N,) int64
    extra: dict        # {"token_sum": (N, 1) float}


class Toy:
    """log_softmax(W[prev] + U[hash(path)] + context + 0.3 sin(sum(path))); alpha = softmax(A[hash])."""

    def __init__(self, seed: int, end_bias: float = 0.0, vocab_size: int = V,
                 end_id: int = END):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(vocab_size, vocab_size, generator=g) * 2
        self.U = torch.randn(NUM_HASH, vocab_size, generator=g) * 2
        self.A = torch.randn(NUM_HASH, P, generator=g)
        self.W[:, end_id] += end_bias
        self.vocab_size = vocab_size
        self.gen = g

    def inputs(self, batch_size: int) -> tuple[Tensor, ToyState]:
        """Per-image context (B, V) and initial state (B rows)."""
        context = torch.randn(batch_size, self.vocab_size, generator=self.gen)
        state = ToyState(torch.randint(0, NUM_HASH, (batch_size,), generator=self.gen),
                         {"token_sum": torch.zeros(batch_size, 1)})
        return context, state

    def step_fn(self, context: Tensor):
        def step(tokens: Tensor, state: ToyState):
            h = (state.path_hash * 3 + tokens + 1) % NUM_HASH
            s = state.extra["token_sum"] + tokens[:, None].float()
            logits = self.W[tokens] + self.U[h] + context + 0.3 * torch.sin(s)
            # logsumexp, not log_softmax/softmax: those take ~20 ms per call on a loaded 2-core CPU
            log_probs = logits - logits.logsumexp(-1, keepdim=True)
            scores = self.A[h]
            alpha = (scores - scores.logsumexp(-1, keepdim=True)).exp()
            return log_probs, ToyState(h, {"token_sum": s}), alpha
        return step


def row(state: ToyState, b: int) -> ToyState:
    return ToyState(state.path_hash[b:b + 1], {"token_sum": state.extra["token_sum"][b:b + 1]})


def reference_beam_search(step_fn, state, beam_size, start_id, end_id, max_len,
                          length_penalty=0.0, num_return=1) -> list[Hypothesis]:
    """Tutorial-style beam search for ONE image, one beam at a time, in Python floats.

    Keep the best ``beam_size - len(finished)`` extensions of the open beams by total log-prob,
    move those ending in <end> aside, stop when no open beam is left or after max_len tokens.
    Return the finished hypotheses ranked best first, then the best unfinished ones.
    """
    beams = [(0.0, [], state, [])]  # (score, tokens incl. <end>, state, alpha rows)
    finished = []
    for _ in range(max_len):
        candidates = []
        for score, tokens, beam_state, alphas in beams:
            prev = tokens[-1] if tokens else start_id
            log_probs, new_state, alpha = step_fn(torch.tensor([prev]), beam_state)
            for token, lp in enumerate(log_probs[0].tolist()):
                candidates.append((score + lp, tokens + [token], new_state, alphas + [alpha[0]]))
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for cand in candidates[:beam_size - len(finished)]:
            if cand[0] == -math.inf:
                continue
            (finished if cand[1][-1] == end_id else beams).append(cand)
        if not beams:
            break

    def rank(c):
        return c[0] / ((5 + len(c[1])) / 6) ** length_penalty

    finished.sort(key=rank, reverse=True)
    beams.sort(key=rank, reverse=True)
    out = [(c, True) for c in finished] + [(c, False) for c in beams]
    return [Hypothesis(tokens=c[1][:-1] if done else c[1], score=c[0],
                       alphas=torch.stack(c[3]), finished=done)
            for c, done in out[:num_return]]


def run_beam(toy: Toy, context, state, beam_size, max_len, **kw):
    step = toy.step_fn(expand_for_beams(context, beam_size))
    return beam_search(step, state, context.shape[0], beam_size, START, END, max_len, **kw)


def run_reference(toy: Toy, context, state, beam_size, max_len, **kw):
    return [reference_beam_search(toy.step_fn(context[b:b + 1]), row(state, b), beam_size,
                                  START, END, max_len, **kw)
            for b in range(context.shape[0])]


def assert_same(got: list[Hypothesis], want: list[Hypothesis], exact: bool = False):
    assert [h.tokens for h in got] == [h.tokens for h in want]
    assert [h.finished for h in got] == [h.finished for h in want]
    for g, w in zip(got, want):
        if exact:
            assert g.score == w.score
            assert torch.equal(g.alphas, w.alphas)
        else:
            assert g.score == pytest.approx(w.score, abs=1e-4)
            # torch.allclose: torch.testing.assert_close imports torch.distributed (~2 s)
            assert g.alphas.shape == w.alphas.shape
            assert torch.allclose(g.alphas, w.alphas, atol=1e-6)


# ---------------------------------------------------------------------------- tests
def test_expand_for_beams_row_layout():
    x = torch.arange(6).view(3, 2)
    y = expand_for_beams(x, 4)
    assert y.shape == (12, 2)
    for b in range(3):
        for k in range(4):
            assert torch.equal(y[b * 4 + k], x[b])


def test_ranking_score_known_values():
    assert ranking_score(-1.0, 7, 0.0) == -1.0
    assert ranking_score(-1.0, 7, 1.0) == pytest.approx(-0.5)  # (5 + 7) / 6 = 2
    assert ranking_score(-2.0, 1, 3.0) == pytest.approx(-2.0)  # length 1 -> factor 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy(seed):
    toy = Toy(seed)
    context, state = toy.inputs(4)
    greedy = greedy_search(toy.step_fn(context), state, 4, START, END, max_len=10)
    beams = run_beam(toy, context, state, beam_size=1, max_len=10)
    assert [len(b) for b in beams] == [1, 1, 1, 1]
    assert_same([b[0] for b in beams], greedy, exact=True)


@pytest.mark.parametrize("seed", [3, 4])
def test_batch_equals_images_one_at_a_time(seed):
    toy = Toy(seed, end_bias=1.0)
    context, state = toy.inputs(3)
    batched = run_beam(toy, context, state, beam_size=3, max_len=8, num_return=3)
    batched_greedy = greedy_search(toy.step_fn(context), state, 3, START, END, max_len=8)
    for b in range(3):
        single = run_beam(toy, context[b:b + 1], row(state, b), beam_size=3, max_len=8,
                          num_return=3)
        assert_same(batched[b], single[0])
        single_greedy = greedy_search(toy.step_fn(context[b:b + 1]), row(state, b), 1, START,
                                      END, max_len=8)
        assert_same([batched_greedy[b]], single_greedy)


@pytest.mark.parametrize("seed,beam_size,max_len,length_penalty,num_return", [
    (10, 3, 8, 0.0, 1),
    (11, 4, 6, 0.0, 4),
    (12, 5, 7, 0.7, 2),
    (13, 2, 9, 1.5, 2),
])
def test_matches_reference(seed, beam_size, max_len, length_penalty, num_return):
    toy = Toy(seed, end_bias=0.5)
    context, state = toy.inputs(3)
    kw = dict(length_penalty=length_penalty, num_return=num_return)
    got = run_beam(toy, context, state, beam_size, max_len, **kw)
    want = run_reference(toy, context, state, beam_size, max_len, **kw)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_reference_detects_wrong_state_order():
    """The toy makes state reordering observable: scrambling the rows changes the result."""
    toy = Toy(20, end_bias=0.5)
    context, state = toy.inputs(2)
    good = toy.step_fn(expand_for_beams(context, 3))

    def scrambled(tokens, st):
        st = ToyState(st.path_hash.roll(1), st.extra)
        return good(tokens, st)

    got = beam_search(scrambled, state, 2, 3, START, END, 8, num_return=3)
    want = run_reference(toy, context, state, 3, 8, num_return=3)
    assert any([h.tokens for h in g] != [h.tokens for h in w] or
               any(abs(a.score - b.score) > 1e-4 for a, b in zip(g, w))
               for g, w in zip(got, want))


@pytest.mark.parametrize("end_bias", [-1.0, 2.0])
def test_sequences_end_or_hit_max_len_and_alphas(end_bias):
    toy = Toy(30, end_bias=end_bias)
    context, state = toy.inputs(4)
    max_len = 6
    results = run_beam(toy, context, state, beam_size=4, max_len=max_len, num_return=4)
    results.append(greedy_search(toy.step_fn(context), state, 4, START, END, max_len))
    for hyps in results:
        for h in hyps:
            assert END not in h.tokens
            if h.finished:
                assert len(h.tokens) + 1 <= max_len
            else:
                assert len(h.tokens) == max_len
            assert h.alphas.shape == (h.length, P)
            assert torch.allclose(h.alphas.sum(-1), torch.ones(h.length))


def test_num_return_sorted_and_distinct():
    toy = Toy(40, end_bias=0.3)
    context, state = toy.inputs(3)
    for lp in (0.0, 1.0):
        for hyps in run_beam(toy, context, state, beam_size=5, max_len=7, num_return=5,
                             length_penalty=lp):
            assert len(hyps) == 5
            flags = [h.finished for h in hyps]
            assert flags == sorted(flags, reverse=True)  # finished first
            for group in (True, False):
                ranks = [ranking_score(h.score, h.length, lp) for h in hyps if h.finished == group]
                assert ranks == sorted(ranks, reverse=True)
            assert len({tuple(h.tokens) + (h.finished,) for h in hyps}) == 5


def test_no_end_returns_best_unfinished():
    toy = Toy(50, end_bias=-math.inf)  # <end> has probability 0
    context, state = toy.inputs(2)
    got = run_beam(toy, context, state, beam_size=3, max_len=5, num_return=2)
    want = run_reference(toy, context, state, 3, 5, num_return=2)
    for g, w in zip(got, want, strict=True):
        assert len(g) == 2 and not any(h.finished for h in g)
        assert all(len(h.tokens) == 5 for h in g)
        assert_same(g, w)
    greedy = greedy_search(toy.step_fn(context), state, 2, START, END, max_len=5)
    assert all(not h.finished and len(h.tokens) == 5 for h in greedy)


def test_early_exit_stops_before_max_len():
    toy = Toy(60, end_bias=4.0)
    context, state = toy.inputs(3)
    calls = []
    inner = toy.step_fn(expand_for_beams(context, 3))

    def counting(tokens, st):
        calls.append(tokens.shape)
        return inner(tokens, st)

    got = beam_search(counting, state, 3, 3, START, END, max_len=30)
    assert len(calls) < 30
    assert all(shape == (9,) for shape in calls)  # fixed shapes: B*K rows every step
    want = run_reference(toy, context, state, 3, 30)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_length_penalty_prefers_longer_sequence():
    a, start, end = 1, 2, 3  # id 0 is <pad>
    probs = torch.full((4, 4), 0.25)
    probs[start] = torch.tensor([1e-4, 0.4998, 1e-4, 0.5])
    probs[a] = torch.tensor([1e-4, 0.0498, 1e-4, 0.95])
    table = probs.log()

    def step(tokens, st):
        return table[tokens], st + 1, None

    state = torch.zeros(1)
    plain = beam_search(step, state, 1, 2, start, end, max_len=2, num_return=2)[0]
    penalised = beam_search(step, state, 1, 2, start, end, max_len=2, num_return=2,
                            length_penalty=1.0)[0]
    assert [h.tokens for h in plain] == [[], [a]]
    assert [h.tokens for h in penalised] == [[a], []]
    assert all(h.finished and h.alphas is None for h in plain + penalised)
    long_score = math.log(0.4998) + math.log(0.95)  # raw score, not normalised
    assert penalised[0].score == pytest.approx(long_score, abs=1e-5)
    assert penalised[0].score < penalised[1].score
    assert greedy_search(step, state, 1, start, end, 2)[0].tokens == []


def test_vocab_smaller_than_beam():
    toy = Toy(70, vocab_size=3, end_id=2)
    context, state = toy.inputs(2)

    def run(max_len):
        step = toy.step_fn(expand_for_beams(context, 5))
        return beam_search(step, state, 2, 5, 1, 2, max_len, num_return=5)

    one = run(1)  # only 3 sequences of length 1 exist: [0], [1], [<end>]
    for hyps in one:
        assert len(hyps) == 3
        assert sorted((tuple(h.tokens), h.finished) for h in hyps) == [
            ((), True), ((0,), False), ((1,), False)]
        assert all(math.isfinite(h.score) for h in hyps)
    got = run(4)
    want = [reference_beam_search(toy.step_fn(context[b:b + 1]), row(state, b), 5, 1, 2, 4,
                                  num_return=5) for b in range(2)]
    for g, w in zip(got, want, strict=True):
        assert len(g) == 5
        assert_same(g, w)


def test_bad_inputs_raise_clear_errors():
    toy = Toy(80)
    context, state = toy.inputs(2)
    step = toy.step_fn(expand_for_beams(context, 2))
    with pytest.raises(ValueError, match="num_return"):
        beam_search(step, state, 2, 2, START, END, 5, num_return=3)
    with pytest.raises(ValueError, match=r"state\.path_hash"):
        beam_search(step, state, 3, 2, START, END, 5)
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(toy.step_fn(context), state, 2, START, END, 0)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(step, state, 2, 2, START, END, 5, length_penalty=-1.0)
    with pytest.raises(ValueError, match="log_probs"):
        beam_search(lambda t, s: (torch.zeros(3, V), s, None), state, 2, 2, START, END, 5)
    with pytest.raises(ValueError, match="end_id"):
        beam_search(step, state, 2, 2, START, V + 3, 5)
