"""CIDEr-D (Vedantam et al. 2015), vectorised with numpy: the SCST reward and ``val/cider``.

The formulas are those of the COCO caption evaluation (pycocoevalcap's ``CiderScorer``, the same
code as self-critical.pytorch's ``ciderD_scorer.py``): for n = 1..4, each n-gram of a caption is
weighted ``tf * (log(num_documents) - log(max(1, df)))``; a candidate and a reference score the
clipped cosine ``sum min(w_c, w_r) * w_r / (|w_c| |w_r|)`` (0 when either vector is empty) times
the length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))`` with sigma = 6, where a caption's length
is its number of bigrams (``max(words - 1, 0)``, as the reference code counts it); the n-gram
scores are averaged over n, over the image's references, and scaled by 10.

Captions are sequences of non-negative integer token ids (word-map ids for the reward; words are
interned to ids by :func:`cider_d_corpus`). An n-gram is keyed by one int64, so ids must be below
:data:`MAX_TOKEN_ID`. All per-caption work is array work over the batch: one ``np.unique`` per
batch counts the n-grams, one ``searchsorted`` finds their document frequencies and one more
pairs each candidate n-gram with the same n-gram in the references of its image.

Document frequencies (DF) come either from the evaluated references themselves (COCO evaluation,
``val/cider``) or from a fixed corpus, the train split's references (the SCST reward, as
self-critical.pytorch's ``cached_tokens``): :class:`DocumentFrequencies`.

No torch, Lightning or Hydra here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.files import atomic_write

NGRAMS = 4
SIGMA = 6.0
#: Token ids must be below this: an n-gram of up to 4 ids in base MAX_TOKEN_ID, times 4 for n,
#: fits an int64.
MAX_TOKEN_ID = 2 ** 15 - 1
_BASE = MAX_TOKEN_ID + 1

Tokens = Sequence[int]


@dataclass(frozen=True)
class _NGrams:
    """The n-gram counts of a list of captions, as flat arrays (one row per distinct n-gram)."""
    caption: np.ndarray  # (E,) int64, which caption
    key: np.ndarray  # (E,) int64, the n-gram (see _keys); (key & 3) + 1 = n
    count: np.ndarray  # (E,) float64, its count in that caption
    length: np.ndarray  # (C,) float64, bigrams per caption (CIDEr-D's length)


def _as_matrix(captions: Sequence[Tokens]) -> tuple[np.ndarray, np.ndarray]:
    """(C, Lmax) int64 ids (padded with -1) and (C,) lengths."""
    lengths = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    width = int(lengths.max()) if len(captions) else 0
    matrix = np.full((len(captions), max(width, 1)), -1, dtype=np.int64)
    if width:
        flat = np.fromiter((int(t) for c in captions for t in c), dtype=np.int64,
                           count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(captions)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        matrix[rows, cols] = flat
        if flat.min() < 0 or flat.max() >= MAX_TOKEN_ID:
            raise ValueError(f"CIDEr-D token ids must lie in 0..{MAX_TOKEN_ID - 1}, got "
                             f"{flat.min()}..{flat.max()}")
    return matrix, lengths


def _count_ngrams(captions: Sequence[Tokens]) -> _NGrams:
    """Count the 1..4-grams of every caption (an empty caption has none)."""
    matrix, lengths = _as_matrix(captions)
    num, width = matrix.shape
    keys, owners = [], []
    value = np.zeros((num, width), dtype=np.int64)
    for n in range(1, NGRAMS + 1):
        if n > width:
            break
        value = value[:, :width - n + 1] * _BASE + matrix[:, n - 1:]  # (C, width - n + 1)
        valid = np.arange(width - n + 1)[None] <= (lengths - n)[:, None]
        rows, _ = np.nonzero(valid)
        keys.append(value[valid] * NGRAMS + (n - 1))
        owners.append(rows)
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    # Distinct (caption, n-gram) pairs with their counts: sort by n-gram within caption.
    order = np.lexsort((key, owner))
    key, owner = key[order], owner[order]
    new = np.ones(len(key), dtype=bool)
    new[1:] = (key[1:] != key[:-1]) | (owner[1:] != owner[:-1])
    starts = np.flatnonzero(new)
    count = np.diff(np.append(starts, len(key))).astype(np.float64)
    return _NGrams(owner[starts], key[starts], count, np.maximum(lengths - 1, 0).astype(np.float64))


@dataclass(frozen=True)
class DocumentFrequencies:
    """In how many images' reference sets each n-gram occurs, and the number of images.

    Args:
        keys: (U,) int64 sorted n-gram keys.
        counts: (U,) float64 document frequencies of those n-grams.
        num_documents: the number of images (CIDEr-D's ``ref_len`` is its log).
    """
    keys: np.ndarray
    counts: np.ndarray
    num_documents: int

    @classmethod
    def from_references(cls, references: Sequence[Sequence[Tokens]]) -> DocumentFrequencies:
        """DF of a corpus: ``references[i]`` lists the reference captions of image ``i``."""
        flat = [ref for refs in references for ref in refs]
        image = np.repeat(np.arange(len(references)), [len(refs) for refs in references])
        grams = _count_ngrams(flat)
        pairs = np.unique(np.stack([grams.key, image[grams.caption]]), axis=1)  # (2, distinct)
        keys, counts = np.unique(pairs[0], return_counts=True)
        return cls(keys, counts.astype(np.float64), len(references))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """DF of each key, 0 for n-grams that never occur."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), dtype=np.float64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.counts[pos], 0.0)

    def save(self, path: str | os.PathLike, fingerprint: str) -> None:
        """Write an ``.npz`` (atomically) that :meth:`load` accepts only with ``fingerprint``."""
        with atomic_write(path, "wb") as f:
            np.savez(f, keys=self.keys, counts=self.counts,
                     num_documents=np.int64(self.num_documents), fingerprint=np.str_(fingerprint))

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str) -> DocumentFrequencies | None:
        """The cached DF at ``path``, or None when it is missing, unreadable or was computed
        from other references (its fingerprint differs)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != fingerprint:
                    return None
                return cls(data["keys"], data["counts"], int(data["num_documents"]))
        except (OSError, KeyError, ValueError):
            return None


def references_fingerprint(references: Sequence[Sequence[Tokens]]) -> str:
    """A hash of the reference ids (which images, which captions, in order)."""
    digest = hashlib.sha256()
    for refs in references:
        digest.update(b"[")
        for ref in refs:
            digest.update(np.asarray(ref, dtype=np.int64).tobytes() + b";")
    return digest.hexdigest()


def cached_document_frequencies(path: str | os.PathLike,
                                references: Sequence[Sequence[Tokens]]) -> DocumentFrequencies:
    """DF of ``references``, read from ``path`` if it was computed from the same references,
    else computed and written there (the train split's DF, computed once per prepared data)."""
    fingerprint = references_fingerprint(references)
    cached = DocumentFrequencies.load(path, fingerprint)
    if cached is not None:
        return cached
    document_frequencies = DocumentFrequencies.from_references(references)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    document_frequencies.save(path, fingerprint)
    return document_frequencies


class CiderD:
    """CIDEr-D of candidates against references, with fixed document frequencies.

    Args:
        document_frequencies: the DF (e.g. of the train split's references).
        sigma: standard deviation of the Gaussian length penalty.
    """

    def __init__(self, document_frequencies: DocumentFrequencies, sigma: float = SIGMA):
        if document_frequencies.num_documents < 1:
            raise ValueError("CIDEr-D document frequencies of an empty corpus (0 images)")
        self.document_frequencies = document_frequencies
        self.sigma = float(sigma)
        self.log_num_documents = float(np.log(float(document_frequencies.num_documents)))

    def _weights(self, grams: _NGrams, num_captions: int) -> tuple[np.ndarray, np.ndarray]:
        """tf-idf weight per n-gram row and the norm per (caption, n): (E,), (C, 4)."""
        df = self.document_frequencies.lookup(grams.key)
        weight = grams.count * (self.log_num_documents - np.log(np.maximum(1.0, df)))
        order = grams.key & (NGRAMS - 1)
        squares = np.bincount(grams.caption * NGRAMS + order, weights=weight * weight,
                              minlength=num_captions * NGRAMS)
        return weight, np.sqrt(squares).reshape(num_captions, NGRAMS)

    def scores(self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
               image_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """CIDEr-D of every candidate.

        Args:
            candidates: C token-id sequences (may be empty).
            references: R lists of reference sequences, at least one per image.
            image_index: (C,) which reference list each candidate is scored against
                (e.g. ``[0]*K + [1]*K + ...`` for K samples per image); None = ``range(C)``.

        Returns:
            (C,) float64 scores.
        """
        num_cand = len(candidates)
        image_index = (np.arange(num_cand) if image_index is None
                       else np.asarray(image_index, dtype=np.int64).reshape(-1))
        if len(image_index) != num_cand:
            raise ValueError(f"image_index has {len(image_index)} entries for {num_cand} candidates")
        if num_cand and (image_index.min() < 0 or image_index.max() >= len(references)):
            raise ValueError(f"image_index must lie in 0..{len(references) - 1}")
        num_refs = np.fromiter((len(r) for r in references), dtype=np.int64, count=len(references))
        if len(references) and num_refs.min() < 1:
            raise ValueError(f"CIDEr-D: image {int(np.argmin(num_refs))} has no reference captions")
        if num_cand == 0:
            return np.zeros(0)
        width = int(num_refs.max())
        flat_refs = [ref for refs in references for ref in refs]
        ref_image = np.repeat(np.arange(len(references)), num_refs)
        ref_slot = np.arange(len(flat_refs)) - np.repeat(np.cumsum(num_refs) - num_refs, num_refs)

        cand = _count_ngrams(candidates)
        ref = _count_ngrams(flat_refs)
        cand_w, cand_norm = self._weights(cand, num_cand)
        ref_w, ref_norm = self._weights(ref, len(flat_refs))

        # Reference weights as a table: one row per distinct (image, n-gram), one column per
        # reference slot (0 where that reference lacks the n-gram).
        _, dense = np.unique(np.concatenate([cand.key, ref.key]), return_inverse=True)
        span = int(dense.max()) + 1 if len(dense) else 1
        ref_pair = ref_image[ref.caption] * span + dense[len(cand.key):]
        pairs, pair_row = np.unique(ref_pair, return_inverse=True)
        table = np.zeros((len(pairs), width))
        table[pair_row, ref_slot[ref.caption]] = ref_w
        cand_pair = image_index[cand.caption] * span + dense[:len(cand.key)]
        if len(pairs):
            pos = np.minimum(np.searchsorted(pairs, cand_pair), len(pairs) - 1)
            matched = np.where((pairs[pos] == cand_pair)[:, None], table[pos], 0.0)  # (E_cand, width)
        else:
            matched = np.zeros((len(cand_pair), width))
        clipped = np.minimum(cand_w[:, None], matched) * matched  # the "D": clipped counts

        # Sum per (candidate, n, reference slot).
        row = cand.caption * NGRAMS + (cand.key & (NGRAMS - 1))
        val = np.stack([np.bincount(row, weights=clipped[:, j], minlength=num_cand * NGRAMS)
                        for j in range(width)], axis=1)  # (C*4, width)
        val = val.reshape(num_cand, NGRAMS, width).transpose(0, 2, 1)  # (C, width, 4)

        # Each candidate's references: their norms and lengths, (C, width, ...).
        first = np.cumsum(num_refs) - num_refs
        slots = np.arange(width)
        real = slots[None] < num_refs[image_index][:, None]  # (C, width)
        ref_rows = np.where(real, first[image_index][:, None] + slots[None], 0)
        norm_r = ref_norm[ref_rows]  # (C, width, 4)
        norm_c = cand_norm[:, None, :]  # (C, 1, 4)
        both = (norm_c != 0) & (norm_r != 0)
        val = np.where(both, val / np.where(both, norm_c * norm_r, 1.0), val)
        delta = cand.length[:, None] - ref.length[ref_rows]  # (C, width)
        val = val * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[..., None]
        per_ref = np.where(real, val.mean(axis=2), 0.0)  # (C, width)
        return per_ref.sum(axis=1) / num_refs[image_index] * 10.0


def cider_d_corpus(references: Mapping[Hashable, Sequence[Sequence[str]]] | Sequence[Sequence[Sequence[str]]],
                   hypotheses: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D as the COCO evaluation computes it: DF from the evaluated references.

    Args:
        references: per image, its reference captions as token lists (a list, or a dict keyed
            like ``hypotheses``).
        hypotheses: per image, one candidate caption as a token list (may be empty).

    Returns:
        The mean CIDEr-D over the images.
    """
    if isinstance(references, Mapping):
        if not isinstance(hypotheses, Mapping) or set(references) != set(hypotheses):
            raise ValueError("cider_d_corpus: references and hypotheses need the same image keys")
        keys = list(references)
        references = [references[k] for k in keys]
        hypotheses = [hypotheses[k] for k in keys]
    if len(references) != len(hypotheses):
        raise ValueError(f"cider_d_corpus: {len(references)} reference lists but "
                         f"{len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("cider_d_corpus got no hypotheses")
    vocab: dict[str, int] = {}

    def ids(tokens: Sequence[str]) -> list[int]:
        return [vocab.setdefault(t, len(vocab)) for t in tokens]

    ref_ids = [[ids(r) for r in refs] for refs in references]
    hyp_ids = [ids(h) for h in hypotheses]
    scorer = CiderD(DocumentFrequencies.from_references(ref_ids))
    return float(scorer.scores(hyp_ids, ref_ids).mean())
