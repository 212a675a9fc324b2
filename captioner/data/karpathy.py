"""Read and validate a Karpathy-split JSON (coco, flickr8k, flickr30k, shapes).

The format (Karpathy's ``dataset_*.json``)::

    {"dataset": "coco",
     "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"tokens": ["a", "man", ...], "raw": "A man ..."}, ...],
                 "cocoid": 391895, "imgid": 0}, ...]}

``filepath`` is absent in the Flickr files. ``restval`` counts as ``train``. The image id is
``cocoid`` where present (so COCO evaluation can match it), else ``imgid``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ijson

from captioner.vocab import WordMap

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy JSON.

    Attributes:
        image_id: ``cocoid`` if present, else ``imgid``.
        path: ``image_folder / filepath / filename`` (``filepath`` omitted when absent).
        split: ``train`` (including ``restval``), ``val`` or ``test``.
        tokens: all tokenised captions, one list of words per caption.
        raw: all raw captions, parallel to ``tokens``.
        index: position in the JSON's ``images`` list (for error messages).
        filename: the entry's ``filename`` (for error messages).
    """

    image_id: int
    path: Path
    split: str
    tokens: list[list[str]]
    raw: list[str]
    index: int
    filename: str

    def describe(self) -> str:
        """``image #index (filename, id, split)``: how errors name this entry."""
        return f"image #{self.index} ({self.filename!r}, id {self.image_id}, split {self.split!r})"


def read_karpathy(json_path: str | os.PathLike, image_folder: str | os.PathLike) -> list[KarpathyImage]:
    """Read and validate a Karpathy-split JSON into a list (see :func:`iter_karpathy`).

    Holds every image's captions at once (about 1 GB of Python objects for COCO); code that
    reads the whole dataset should stream with :func:`iter_karpathy` instead.

    Args:
        json_path: the ``dataset_*.json`` file.
        image_folder: folder the entries' ``filepath``/``filename`` are relative to.

    Returns:
        One :class:`KarpathyImage` per entry, in file order.

    Raises:
        FileNotFoundError, ValueError: as :func:`iter_karpathy`.
    """
    return list(iter_karpathy(json_path, image_folder))


def iter_karpathy(json_path: str | os.PathLike, image_folder: str | os.PathLike,
                  file: BinaryIO | None = None) -> Iterator[KarpathyImage]:
    """Stream and validate a Karpathy-split JSON, one image at a time.

    The JSON is parsed incrementally (``ijson``, C backend), so memory does not grow with
    the number of images: only the ids seen so far are kept, for the duplicate check.
    Errors are raised when the iteration reaches them; consume the whole iterator to
    validate the whole file.

    Args:
        json_path: the ``dataset_*.json`` file (named in every error).
        image_folder: folder the entries' ``filepath``/``filename`` are relative to.
        file: an open binary handle of ``json_path`` to read instead of opening it; it is
            rewound first. Several passes over one handle read the same bytes even if the
            file is replaced on disk in between.

    Yields:
        One :class:`KarpathyImage` per entry, in file order.

    Raises:
        FileNotFoundError: the JSON does not exist.
        ValueError: malformed JSON, a missing or mistyped key, an unknown split, an image
            with no captions or a duplicated image id; the message names the JSON file,
            the image (index and filename) and the field.
    """
    json_path = Path(json_path)
    image_folder = Path(image_folder)
    with contextlib.ExitStack() as stack:
        if file is None:
            try:
                file = stack.enter_context(open(json_path, "rb"))
            except FileNotFoundError:
                raise FileNotFoundError(f"Karpathy JSON {json_path} does not exist") from None
        file.seek(0)
        _check_top_level(json_path, file)
        file.seek(0)
        first_index_of_id: dict[int, int] = {}
        for index, entry in enumerate(_entries(json_path, file)):
            image = _parse_image(json_path, image_folder, index, entry)
            if image.image_id in first_index_of_id:
                raise ValueError(f"{json_path}: {image.describe()}: field 'cocoid'/'imgid': id "
                                 f"{image.image_id} is also used by image "
                                 f"#{first_index_of_id[image.image_id]}; image ids must be unique")
            first_index_of_id[image.image_id] = index
            yield image


def _invalid_json(json_path: Path, error: Exception) -> ValueError:
    detail = error.args[0] if error.args else error
    if isinstance(detail, bytes):  # the C backend reports some errors as bytes
        detail = detail.decode("utf-8", errors="replace")
    detail = " ".join(str(detail).split())  # yajl's messages span several lines
    return ValueError(f"{json_path}: not valid JSON ({detail}); expected Karpathy's "
                      f"dataset_*.json format")


def _check_top_level(json_path: Path, file: BinaryIO) -> None:
    """Raise unless the JSON is an object whose key ``images`` holds a list.

    Reads parser events only up to the ``images`` key (the first key in Karpathy's files),
    so this costs nothing for well-formed files; the rest is checked while streaming.
    """
    events = ijson.parse(file, use_float=True)
    try:
        for prefix, event, _ in events:
            if prefix == "" and event != "start_map" and event != "map_key":
                break  # the top level is not an object (or the object ended)
            if prefix == "images":  # the top-level key's value (nested keys have longer prefixes)
                if event == "start_array":
                    return
                break
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise _invalid_json(json_path, e) from None
    raise ValueError(f"{json_path}: missing the top-level 'images' list; expected "
                     f'{{"dataset": ..., "images": [...]}} (Karpathy\'s format)')


def _entries(json_path: Path, file: BinaryIO) -> Iterator[object]:
    """The items of the top-level ``images`` list, parsed one at a time."""
    try:
        yield from ijson.items(file, "images.item", use_float=True)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise _invalid_json(json_path, e) from None


def _parse_image(json_path: Path, image_folder: Path, index: int, entry) -> KarpathyImage:
    where = f"{json_path}: image #{index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    filename = entry.get("filename")
    if isinstance(filename, str):
        where = f"{where} ({filename!r})"

    def field(key: str, kind: type | tuple[type, ...]):
        if key not in entry:
            raise ValueError(f"{where}: missing field {key!r}")
        value = entry[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")
        return value

    filename = field("filename", str)
    split_name = field("split", str)
    if split_name not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: field 'split' is {split_name!r}; expected one of "
                         f"{sorted(_SPLIT_ALIASES)}")
    id_key = "cocoid" if "cocoid" in entry else "imgid"
    image_id = field(id_key, int)
    filepath = field("filepath", str) if "filepath" in entry else ""
    sentences = field("sentences", list)
    if not sentences:
        raise ValueError(f"{where}: field 'sentences' is empty; every image needs at least "
                         f"one caption")
    tokens, raw = [], []
    for k, sentence in enumerate(sentences):
        if not isinstance(sentence, dict):
            raise ValueError(f"{where}: field 'sentences'[{k}] must be an object with "
                             f"'tokens' and 'raw'")
        for key in ("tokens", "raw"):
            if key not in sentence:
                raise ValueError(f"{where}: missing field 'sentences'[{k}][{key!r}]")
        toks = sentence["tokens"]
        if (not isinstance(toks, list) or not toks
                or set(map(type, toks)) != {str} or "" in toks):  # C loops: runs for every caption
            raise ValueError(f"{where}: field 'sentences'[{k}]['tokens'] must be a non-empty "
                             f"list of non-empty strings, got {toks!r:.60}")
        if not isinstance(sentence["raw"], str):
            raise ValueError(f"{where}: field 'sentences'[{k}]['raw'] must be a string")
        tokens.append(list(toks))
        raw.append(sentence["raw"])
    # One Path parse of the joined string: a third of the cost of two Path joins per entry.
    return KarpathyImage(image_id=image_id, path=Path(os.path.join(image_folder, filepath, filename)),
                         split=_SPLIT_ALIASES[split_name], tokens=tokens, raw=raw,
                         index=index, filename=filename)


def build_word_map(images: Iterable[KarpathyImage], min_word_freq: int) -> WordMap:
    """The word map of the **train** split's captions (all of them, any length).

    Words seen at least ``min_word_freq`` times are kept (``>=``, see
    :meth:`captioner.vocab.WordMap.build`); val and test words never leak in. ``images``
    is consumed once and not kept, so it may be :func:`iter_karpathy`'s stream.

    Raises:
        ValueError: there are no train images.
    """
    counts: Counter[str] = Counter()
    num_train = 0
    for image in images:
        if image.split == "train":
            num_train += 1
            for tokens in image.tokens:
                counts.update(tokens)
    if not num_train:
        raise ValueError("no train images (split 'train' or 'restval'); the word map is "
                         "built from the train split")
    return WordMap.from_counts(counts, min_word_freq)
