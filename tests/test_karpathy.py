import copy
import itertools
import json
import os
import re
from pathlib import Path

import pytest

from captioner.data.karpathy import build_word_map, iter_karpathy, read_karpathy
from captioner.vocab import WordMap

GOOD = {"dataset": "coco", "images": [
    {"filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 11, "imgid": 0,
     "sentences": [{"tokens": ["a", "dog"], "raw": "A dog."}, {"tokens": ["a", "cat"], "raw": "A cat"}]},
    {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 12, "imgid": 1,
     "sentences": [{"tokens": ["a", "dog"], "raw": "a dog"}]},
    {"filepath": "val2014", "filename": "c.jpg", "split": "val", "cocoid": 13, "imgid": 2,
     "sentences": [{"tokens": ["giraffe"], "raw": "giraffe"}]},
    {"filepath": "val2014", "filename": "d.jpg", "split": "test", "cocoid": 14, "imgid": 3,
     "sentences": [{"tokens": ["a", "giraffe"], "raw": "a giraffe"}]},
]}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "dataset_test.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_reads_fields_paths_and_restval_as_train(tmp_path):
    images = read_karpathy(write(tmp_path, GOOD), "/data/coco")
    assert [im.split for im in images] == ["train", "train", "val", "test"]
    assert [im.image_id for im in images] == [11, 12, 13, 14]
    assert images[0].path == Path("/data/coco/train2014/a.jpg")
    assert images[0].tokens == [["a", "dog"], ["a", "cat"]] and images[0].raw == ["A dog.", "A cat"]


def test_flickr_entries_without_filepath_or_cocoid(tmp_path):
    data = copy.deepcopy(GOOD)
    for image in data["images"]:
        del image["filepath"], image["cocoid"]
    images = read_karpathy(write(tmp_path, data), "/data/flickr8k")
    assert images[2].path == Path("/data/flickr8k/c.jpg")
    assert [im.image_id for im in images] == [0, 1, 2, 3]


def _broken(mutate):
    data = copy.deepcopy(GOOD)
    mutate(data["images"][2])
    return data


@pytest.mark.parametrize("mutate, field", [
    (lambda im: im.pop("split"), "'split'"),
    (lambda im: im.update(split="holdout"), "'split'"),
    (lambda im: im.update(sentences=[]), "'sentences'"),
    (lambda im: im.pop("sentences"), "'sentences'"),
    (lambda im: im["sentences"][0].pop("tokens"), "'tokens'"),
    (lambda im: im["sentences"][0].pop("raw"), "'raw'"),
    (lambda im: im["sentences"][0].update(tokens="giraffe"), "'tokens'"),
    (lambda im: (im.pop("cocoid"), im.pop("imgid")), "'imgid'"),
    (lambda im: im.update(cocoid="13"), "'cocoid'"),
    (lambda im: im.update(cocoid=11), "'cocoid'"),  # duplicate of image #0
])
def test_malformed_entry_names_file_image_and_field(tmp_path, mutate, field):
    path = write(tmp_path, _broken(mutate))
    with pytest.raises(ValueError) as err:
        read_karpathy(path, tmp_path)
    message = str(err.value)
    assert str(path) in message and "image #2" in message and "c.jpg" in message
    assert field in message


def test_missing_filename_names_image_index(tmp_path):
    path = write(tmp_path, _broken(lambda im: im.pop("filename")))
    with pytest.raises(ValueError, match=re.escape(f"{path}: image #2: missing field 'filename'")):
        read_karpathy(path, tmp_path)


@pytest.mark.parametrize("text", ['{"images": [', '[1, 2]', '{"dataset": "coco"}'])
def test_malformed_json_names_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_karpathy(path, tmp_path)


def test_word_map_from_train_only(tmp_path):
    images = read_karpathy(write(tmp_path, GOOD), tmp_path)
    wm = build_word_map(images, min_word_freq=1)
    assert {"a", "dog", "cat"} <= set(wm.to_dict())
    assert "giraffe" not in wm  # val/test only
    assert wm.encode(["giraffe"])[1] == wm.unk_id
    # restval counts as train: "dog" appears twice in train + restval
    assert "dog" in build_word_map(images, min_word_freq=2) and "cat" not in build_word_map(images, 2)


def test_word_map_needs_train_images(tmp_path):
    data = {"images": [im for im in GOOD["images"] if im["split"] in ("val", "test")]}
    with pytest.raises(ValueError, match="no train images"):
        build_word_map(read_karpathy(write(tmp_path, data), tmp_path), 1)


def test_iter_karpathy_streams_entries_before_a_later_error(tmp_path):
    """Entries come out one at a time: the good ones before an error further on."""
    data = _broken(lambda im: im.update(split="holdout"))
    stream = iter_karpathy(write(tmp_path, data), tmp_path)
    assert [next(stream).image_id, next(stream).image_id] == [11, 12]
    with pytest.raises(ValueError, match=r"image #2 \('c.jpg'\): field 'split'"):
        next(stream)
    truncated = write(tmp_path, json.dumps(GOOD)[:-40])  # cut inside the last entry
    stream = iter_karpathy(truncated, tmp_path)
    assert [im.image_id for im in itertools.islice(stream, 3)] == [11, 12, 13]
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: not valid JSON")):
        next(stream)


def test_iter_karpathy_equals_json_load(tmp_path):
    """The streamed images hold exactly what json.load gives, also when 'images' is not the
    first key and a nested object has its own 'images' key."""
    data = {"dataset": "coco", "info": {"images": [{"not": "an entry"}]}, **GOOD}
    data["images"][0]["sentences"][0]["raw"] = "Caf\u00e9 \u00fc\u00df \"quoted\" \\ \n"
    path = write(tmp_path, data)
    loaded = json.loads(path.read_text())["images"]
    images = list(iter_karpathy(path, tmp_path))
    assert [im.index for im in images] == list(range(len(loaded)))
    for image, entry in zip(images, loaded):
        assert image.image_id == entry["cocoid"] and image.filename == entry["filename"]
        assert image.path == tmp_path / entry["filepath"] / entry["filename"]
        assert image.tokens == [s["tokens"] for s in entry["sentences"]]
        assert image.raw == [s["raw"] for s in entry["sentences"]]
    assert images == read_karpathy(path, tmp_path)


def test_iter_karpathy_rereads_one_handle(tmp_path):
    """With file=, every pass rewinds the handle and reads its bytes, even after the path is
    replaced on disk."""
    path = write(tmp_path, GOOD)
    with open(path, "rb") as handle:
        first = list(iter_karpathy(path, tmp_path, file=handle))
        other = copy.deepcopy(GOOD)
        other["images"][0]["cocoid"] = 99
        replacement = tmp_path / "other.json"
        replacement.write_text(json.dumps(other))
        os.replace(replacement, path)
        assert list(iter_karpathy(path, tmp_path, file=handle)) == first
    assert next(iter_karpathy(path, tmp_path)).image_id == 99


@pytest.mark.parametrize("content", [b"", b'{"images": {}}', b'{"images": 3, "dataset": "x"}',
                                     b'{"images": []} trailing', b'{"images": ["\xff"]}',
                                     b'{"dataset": "coco", "info": {"images": []}}'])
def test_more_malformed_json_names_the_file(tmp_path, content):
    path = tmp_path / "dataset_test.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_karpathy(path, tmp_path)
    assert str(err.value).startswith(f"{path}: ") and "Karpathy" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_json_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_none.json does not exist"):
        read_karpathy(tmp_path / "dataset_none.json", tmp_path)


def test_word_map_streams_and_equals_build_over_train_captions(tmp_path):
    path = write(tmp_path, GOOD)
    train_captions = [t for im in read_karpathy(path, tmp_path) if im.split == "train" for t in im.tokens]
    stream = iter_karpathy(path, tmp_path)
    for min_word_freq in (1, 2):
        assert (build_word_map(iter_karpathy(path, tmp_path), min_word_freq)
                == WordMap.build(train_captions, min_word_freq))
    build_word_map(stream, 1)
    assert next(stream, None) is None  # consumed in one pass
