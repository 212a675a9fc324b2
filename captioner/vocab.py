"""WordMap: the word <-> id mapping, special-token ids, caption encoding and JSON I/O.

The JSON form is the tutorial's ``WORDMAP_*.json``: a flat ``{word: id}`` object with
``<pad>`` = 0 and ``<unk>``, ``<start>``, ``<end>`` present. Word maps written by the
tutorial load here unchanged, and ours load in the tutorial's code.

No torch here: this module is shared by preprocessing, training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from captioner.files import write_json_atomic

PAD = "<pad>"
UNK = "<unk>"
START = "<start>"
END = "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)


class WordMap:
    """An immutable word <-> id mapping with the four special tokens.

    Args:
        word_to_id: ``{word: id}`` with unique ids ``0..n-1``, ``<pad>`` = 0 and the
            special tokens ``<unk> <start> <end>`` present (the tutorial's convention).
    """

    def __init__(self, word_to_id: dict[str, int]):
        if not isinstance(word_to_id, dict) or not word_to_id:
            raise ValueError("word map must be a non-empty {word: id} mapping")
        missing = [t for t in SPECIAL_TOKENS if t not in word_to_id]
        if missing:
            raise ValueError(f"word map lacks the special token(s) {missing}; "
                             f"a word map needs {list(SPECIAL_TOKENS)}")
        if word_to_id[PAD] != 0:
            raise ValueError(f"word map has <pad> = {word_to_id[PAD]}; it must be 0")
        ids = sorted(word_to_id.values())
        if ids != list(range(len(ids))):
            raise ValueError("word map ids must be unique and cover 0..n-1 without gaps")
        self._word_to_id = dict(word_to_id)
        self._id_to_word = {i: w for w, i in word_to_id.items()}
        self.pad_id = word_to_id[PAD]
        self.unk_id = word_to_id[UNK]
        self.start_id = word_to_id[START]
        self.end_id = word_to_id[END]

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_word_freq: int) -> "WordMap":
        """Build from tokenised captions, keeping words seen at least ``min_word_freq`` times.

        The tutorial keeps words with frequency strictly greater than its
        ``min_word_freq``; ours uses ``>=``, so our ``min_word_freq=6`` is the threshold of
        the tutorial's ``min_word_freq=5`` (preprocessing passes train captions only, where the
        tutorial counted every split). Words are ordered by frequency (descending), then
        alphabetically, so the result does not depend on caption order (the tutorial's follows
        it). Ids: words ``1..n``, then ``<unk>``, ``<start>``, ``<end>`` as in the tutorial,
        ``<pad>`` = 0.
        """
        if min_word_freq < 1:
            raise ValueError(f"min_word_freq must be >= 1, got {min_word_freq}")
        counts: Counter[str] = Counter()
        for tokens in captions:
            counts.update(tokens)
        return cls.from_counts(counts, min_word_freq)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_word_freq: int) -> "WordMap":
        """Build from word counts (``{word: times seen}``); the rules of :meth:`build`.

        Lets a caller count words while streaming captions, without keeping them.
        """
        if min_word_freq < 1:
            raise ValueError(f"min_word_freq must be >= 1, got {min_word_freq}")
        for tok in SPECIAL_TOKENS:
            if tok in counts:
                raise ValueError(f"caption token {tok!r} collides with a special token")
        words = sorted((w for w, c in counts.items() if c >= min_word_freq),
                       key=lambda w: (-counts[w], w))
        word_to_id = {w: i + 1 for i, w in enumerate(words)}
        n = len(word_to_id)
        word_to_id[UNK] = n + 1
        word_to_id[START] = n + 2
        word_to_id[END] = n + 3
        word_to_id[PAD] = 0
        return cls(word_to_id)

    # ------------------------------------------------------------------ mapping
    def __len__(self) -> int:
        return len(self._word_to_id)

    def __contains__(self, word: str) -> bool:
        return word in self._word_to_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordMap) and self._word_to_id == other._word_to_id

    def __repr__(self) -> str:
        return f"WordMap({len(self)} entries)"

    def id_of(self, word: str) -> int:
        return self._word_to_id.get(word, self.unk_id)

    def word_of(self, idx: int) -> str:
        return self._id_to_word[int(idx)]

    @property
    def special_ids(self) -> dict[str, int]:
        """Keyword arguments for the model: ``pad_id, unk_id, start_id, end_id``."""
        return {"pad_id": self.pad_id, "unk_id": self.unk_id,
                "start_id": self.start_id, "end_id": self.end_id}

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` then ``<pad>`` up to ``max_len + 2`` ids.

        Unknown words map to ``<unk>``. With ``max_len`` None no padding is added.
        The caption length (the tutorial's ``caplen``) is ``len(tokens) + 2``.
        """
        if max_len is not None and len(tokens) > max_len:
            raise ValueError(f"caption has {len(tokens)} tokens, more than max_len={max_len}")
        ids = [self.start_id] + [self.id_of(t) for t in tokens] + [self.end_id]
        if max_len is not None:
            ids += [self.pad_id] * (max_len + 2 - len(ids))
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of an id sequence: stops at ``<end>``, drops ``<start>`` and ``<pad>``."""
        words = []
        for idx in ids:
            idx = int(idx)
            if idx == self.end_id:
                break
            if idx in (self.start_id, self.pad_id):
                continue
            words.append(self._id_to_word[idx])
        return words

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, int]:
        return dict(self._word_to_id)

    @classmethod
    def from_dict(cls, word_to_id: dict[str, int]) -> "WordMap":
        return cls({str(k): int(v) for k, v in word_to_id.items()})

    def fingerprint(self) -> str:
        """A short hash of the mapping: equal iff the mappings are equal."""
        blob = json.dumps(sorted(self._word_to_id.items()), separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write the tutorial's JSON form atomically (temp file, then rename)."""
        write_json_atomic(path, self._word_to_id)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordMap":
        path = Path(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"word map {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # e.g. a checkpoint given instead
            raise ValueError(f"word map {path} is not a JSON text file ({e}); expected the "
                             f"tutorial's WORDMAP_*.json") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"word map {path}: {e}") from None
