"""CIDEr-D: the vectorised scorer equals pycocoevalcap's CiderScorer (the reference CIDEr-D code,
identical to self-critical.pytorch's ciderD_scorer.py) on the same captions and DF."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from captioner.cider import (CiderD, DocumentFrequencies, cached_document_frequencies,
                             cider_d_corpus)
from captioner.data.shapes import captions as shape_captions
from captioner.data.shapes import draw_scene

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.cider.cider_scorer import CiderScorer  # noqa: E402


def _text(ids) -> str:
    return " ".join(str(t) for t in ids)


def reference_cider_d(candidates, references, corpus=None) -> np.ndarray:
    """pycocoevalcap's CiderScorer; DF from ``corpus`` (SCP's cached DF: compute_doc_freq over
    the corpus, ref_len = log(images)) or, when None, from ``references`` (COCO evaluation)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for cand, refs in zip(candidates, references):
        scorer += (_text(cand), [_text(r) for r in refs])
    if corpus is None:
        return np.array(scorer.compute_score()[1])
    df_scorer = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        df_scorer.cook_append(None, [_text(r) for r in refs])
    df_scorer.compute_doc_freq()
    scorer.document_frequency = defaultdict(float, df_scorer.document_frequency)
    # compute_cider sets ref_len = log(len(crefs)); the corpus DF needs log(corpus images), so
    # its crefs report the corpus size as their length (iterating them is unchanged).
    num_images = len(df_scorer.crefs)

    class CorpusSized(list):
        def __len__(self):
            return num_images

    scorer.crefs = CorpusSized(scorer.crefs)
    return np.array(scorer.compute_cider())


def _random_captions(rng: random.Random, num_images: int, vocab: int):
    refs, cands = [], []
    for _ in range(num_images):
        refs.append([[rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
                     for _ in range(rng.randint(1, 6))])
        kind = rng.random()
        if kind < 0.1:
            cands.append([])  # empty candidate
        elif kind < 0.2:
            cands.append([rng.randrange(vocab)] * rng.randint(1, 9))  # one word repeated
        elif kind < 0.4:
            cands.append(list(rng.choice(refs[-1])))  # a reference itself
        elif kind < 0.5:
            cands.append([rng.randrange(vocab)])  # one word
        else:
            cands.append([rng.randrange(vocab) for _ in range(rng.randint(1, 16))])
    return cands, refs


def _shape_captions(rng: random.Random, num_images: int):
    """Real captions of the built-in shapes data, as word lists; the candidate of an image is a
    caption of a different scene, a reference of its own or a truncated one."""
    scenes = []
    for _ in range(num_images):
        _, shapes, relations = draw_scene(rng, 32)
        scenes.append([c.split() for c in shape_captions(rng, shapes, relations, count=5)])
    cands = []
    for i, refs in enumerate(scenes):
        other = scenes[(i + 1) % len(scenes)]
        cands.append(rng.choice([rng.choice(other), rng.choice(refs), rng.choice(refs)[:3],
                                 rng.choice(refs) + rng.choice(refs)]))
    return cands, scenes


def _ids(cands, refs):
    vocab: dict[str, int] = {}

    def enc(words):
        return [vocab.setdefault(w, len(vocab)) for w in words]
    return [enc(c) for c in cands], [[enc(r) for r in rs] for rs in refs]


@pytest.mark.parametrize("source", ["random", "shapes"])
def test_equals_pycocoevalcap_with_train_document_frequencies(source):
    rng = random.Random(7)
    if source == "random":
        cands, refs = _random_captions(rng, 300, vocab=25)
        _, corpus = _random_captions(rng, 200, vocab=25)
    else:
        cands, refs = _ids(*_shape_captions(rng, 300))
        corpus = refs[100:] + refs[:50]  # a DF corpus that overlaps the scored images in part
    ours = CiderD(DocumentFrequencies.from_references(corpus)).scores(cands, refs)
    expected = reference_cider_d(cands, refs, corpus=corpus)
    assert ours.shape == (len(cands),)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert ours.max() > 1.0 and (ours == 0).any()  # the comparison covers real and zero scores


@pytest.mark.parametrize("source", ["random", "shapes"])
def test_corpus_mode_equals_pycocoevalcap(source):
    rng = random.Random(3)
    cands, refs = (_random_captions(rng, 300, vocab=30) if source == "random"
                   else _shape_captions(rng, 300))
    expected = reference_cider_d(*_ids(cands, refs))
    as_words = [[str(t) for t in c] for c in cands], [[[str(t) for t in r] for r in rs] for rs in refs]
    assert cider_d_corpus(as_words[1], as_words[0]) == pytest.approx(expected.mean(), abs=1e-6)


def test_samples_share_their_image_references():
    rng = random.Random(1)
    cands, refs = _random_captions(rng, 40, vocab=12)
    k = 5
    samples = [c for c in cands for _ in range(k)]  # K samples per image, rows b*K + j
    scorer = CiderD(DocumentFrequencies.from_references(refs))
    grouped = scorer.scores(samples, refs, image_index=np.repeat(np.arange(len(refs)), k))
    np.testing.assert_allclose(grouped, np.repeat(scorer.scores(cands, refs), k), atol=1e-12)


def test_known_values():
    refs = [[[1, 2, 3, 4]], [[5, 6]]]
    scorer = CiderD(DocumentFrequencies.from_references(refs))
    perfect, empty = scorer.scores([[1, 2, 3, 4], []], refs)
    assert perfect == pytest.approx(10.0)  # identical caption: cosine 1, no length penalty
    assert empty == 0.0
    clipped = scorer.scores([[1, 1, 1, 1, 1, 1, 1, 1]], [[[1, 2, 3, 4]]])[0]
    assert 0 < clipped < scorer.scores([[1]], [[[1, 2, 3, 4]]])[0]  # repeated words are clipped


def test_document_frequency_cache(tmp_path):
    refs = [[[1, 2], [2, 3]], [[3, 4]]]
    path = tmp_path / "TRAIN_CIDER_DF.npz"
    first = cached_document_frequencies(path, refs)
    assert path.is_file()
    # Unigram 3 occurs in both images; unigram 1 in one.
    assert first.lookup(np.array([3 * 4, 1 * 4, 9 * 4])).tolist() == [2.0, 1.0, 0.0]
    again = cached_document_frequencies(path, refs)
    np.testing.assert_array_equal(again.keys, first.keys)
    changed = cached_document_frequencies(path, [[[1, 2]], [[3, 4]]])  # references changed
    assert changed.lookup(np.array([3 * 4]))[0] == 1.0
    path.write_bytes(b"not an npz")
    assert cached_document_frequencies(path, refs).num_documents == 2  # rebuilt, not an error


def test_rejects_bad_input():
    scorer = CiderD(DocumentFrequencies.from_references([[[1]]]))
    with pytest.raises(ValueError, match="no reference"):
        scorer.scores([[1]], [[]])
    with pytest.raises(ValueError, match="token ids"):
        scorer.scores([[-2]], [[[1]]])
    with pytest.raises(ValueError, match="image_index"):
        scorer.scores([[1]], [[[1]]], image_index=[3])
