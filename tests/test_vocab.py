import json
import os

import pytest

from captioner.files import atomic_write, write_json_atomic
from captioner.vocab import END, PAD, START, UNK, WordMap

CAPTIONS = [["a", "dog", "runs"], ["a", "cat", "sits"], ["a", "dog", "sits"], ["zebra"]]


def test_encode_decode_round_trip_and_padding():
    wm = WordMap.build(CAPTIONS, min_word_freq=1)
    ids = wm.encode(["a", "dog", "sits"], max_len=6)
    assert len(ids) == 8
    assert ids[0] == wm.start_id and ids[4] == wm.end_id and ids[5:] == [wm.pad_id] * 3
    assert wm.decode(ids) == ["a", "dog", "sits"]


def test_rare_words_map_to_unk_with_inclusive_threshold():
    wm = WordMap.build(CAPTIONS, min_word_freq=2)  # >= 2: a(3) dog(2) sits(2) kept
    assert {"a", "dog", "sits"} <= set(wm.to_dict())
    assert "cat" not in wm and "zebra" not in wm
    assert wm.encode(["cat", "dog"])[1:3] == [wm.unk_id, wm.id_of("dog")]
    assert wm.decode(wm.encode(["cat"])) == [UNK]


def test_ids_contiguous_and_specials_in_tutorial_positions():
    wm = WordMap.build(CAPTIONS, min_word_freq=1)
    d = wm.to_dict()
    assert sorted(d.values()) == list(range(len(d)))
    n = len(d) - 4
    assert (d[PAD], d[UNK], d[START], d[END]) == (0, n + 1, n + 2, n + 3)
    assert d["a"] == 1  # most frequent word first


def test_build_ignores_caption_order():
    assert WordMap.build(CAPTIONS, 1) == WordMap.build(CAPTIONS[::-1], 1)


def test_tutorial_word_map_loads_and_ours_is_plain_dict(tmp_path):
    tutorial = {"a": 1, "dog": 2, "<unk>": 3, "<start>": 4, "<end>": 5, "<pad>": 0}
    path = tmp_path / "WORDMAP_tutorial.json"
    path.write_text(json.dumps(tutorial))
    wm = WordMap.load(path)
    assert (wm.pad_id, wm.unk_id, wm.start_id, wm.end_id) == (0, 3, 4, 5)
    assert wm.decode([4, 1, 2, 5, 0]) == ["a", "dog"]

    ours = tmp_path / "WORDMAP_ours.json"
    wm.save(ours)
    raw = json.loads(ours.read_text())
    assert raw == tutorial and all(isinstance(v, int) for v in raw.values())
    assert WordMap.load(ours) == wm


def test_bad_word_maps_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="<pad>"):
        WordMap({"a": 1, "<unk>": 2, "<start>": 3, "<end>": 4})
    with pytest.raises(ValueError, match="0..n-1"):
        WordMap({"<pad>": 0, "<unk>": 2, "<start>": 3, "<end>": 4})
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        WordMap.load(bad)
    checkpoint = tmp_path / "model.ckpt"  # the arguments swapped: a binary file
    checkpoint.write_bytes(b"PK\x03\x04\x80\x81\xff")
    with pytest.raises(ValueError, match=r"model.ckpt is not a JSON text file.*WORDMAP"):
        WordMap.load(checkpoint)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """A block that raises leaves the old content and no temp file; one that ends replaces
    it, with the permissions a plain ``open`` would give (not mkstemp's 0600)."""
    path = tmp_path / "results.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["results.bin"]
    with atomic_write(path, "wb") as f:
        f.write(b"new")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors via /proc")
def test_atomic_json_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """The data is flushed (fsync) before the rename and the folder after it, so a crash
    leaves the old file or the new one under the name, never a partial one; no temp is left."""
    path = tmp_path / "out" / "word_map.json"
    path.parent.mkdir()
    path.write_text('{"old": 1}')
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # what the descriptor is open on (Linux: /proc/self/fd)
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(path, {"new": 2})
    temp = events[0][1]
    assert temp.startswith(".word_map.json.") and temp.endswith(".tmp")
    assert events == [("fsync", temp), ("replace", temp, "word_map.json"), ("fsync", "out")]
    assert json.loads(path.read_text()) == {"new": 2}
    assert [p.name for p in path.parent.iterdir()] == ["word_map.json"]
