import json

import pytest

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
