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

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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
    """Read and validate a Karpathy-split JSON.

    Args:
        json_path: the ``dataset_*.json`` file.
        image_folder: folder the entries' ``filepath``/``filename`` are relative to.

    Returns:
        One :class:`KarpathyImage` per entry, in file order.

    Raises:
        FileNotFoundError: the JSON does not exist.
        ValueError: malformed JSON, a missing or mistyped key, an unknown split, an image
            with no captions or a duplicated image id; the message names the JSON file,
            the image (index and filename) and the field.
    """
    json_path = Path(json_path)
    image_folder = Path(image_folder)
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"Karpathy JSON {json_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e}); expected Karpathy's "
                         f"dataset_*.json format") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: missing the top-level 'images' list; expected "
                         f'{{"dataset": ..., "images": [...]}} (Karpathy\'s format)')

    images: list[KarpathyImage] = []
    first_index_of_id: dict[int, int] = {}
    for index, entry in enumerate(data["images"]):
        image = _parse_image(json_path, image_folder, index, entry)
        if image.image_id in first_index_of_id:
            raise ValueError(f"{json_path}: {image.describe()}: field 'cocoid'/'imgid': id "
                             f"{image.image_id} is also used by image "
                             f"#{first_index_of_id[image.image_id]}; image ids must be unique")
        first_index_of_id[image.image_id] = index
        images.append(image)
    return images


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
                or not all(isinstance(t, str) and t for t in toks)):
            raise ValueError(f"{where}: field 'sentences'[{k}]['tokens'] must be a non-empty "
                             f"list of non-empty strings, got {toks!r:.60}")
        if not isinstance(sentence["raw"], str):
            raise ValueError(f"{where}: field 'sentences'[{k}]['raw'] must be a string")
        tokens.append(list(toks))
        raw.append(sentence["raw"])
    return KarpathyImage(image_id=image_id, path=image_folder / filepath / filename,
                         split=_SPLIT_ALIASES[split_name], tokens=tokens, raw=raw,
                         index=index, filename=filename)


def build_word_map(images: Iterable[KarpathyImage], min_word_freq: int) -> WordMap:
    """The word map of the **train** split's captions (all of them, any length).

    Words seen at least ``min_word_freq`` times are kept (``>=``, see
    :meth:`captioner.vocab.WordMap.build`); val and test words never leak in.

    Raises:
        ValueError: there are no train images.
    """
    train = [image for image in images if image.split == "train"]
    if not train:
        raise ValueError("no train images (split 'train' or 'restval'); the word map is "
                         "built from the train split")
    return WordMap.build((tokens for image in train for tokens in image.tokens), min_word_freq)
