"""CaptionH5Dataset, EpochAwareSampler and collate on tiny tutorial-layout files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import pytest
import torch
from torch.utils.data import DataLoader

from captioner.data.dataset import CaptionH5Dataset, EpochAwareSampler, collate
from captioner.vocab import WordMap

MAX_LEN = 6
T = MAX_LEN + 2


def data_name(dataset: str = "coco", cpi: int = 3, min_word_freq: int = 1) -> str:
    return f"{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq"


def tiny_word_map(num_images: int, cpi: int) -> WordMap:
    words = [f"img{i}" for i in range(num_images)] + [f"cap{j}" for j in range(cpi)] + ["a", "b"]
    return WordMap.build([words], min_word_freq=1)


def write_prepared(folder: Path, name: str, num_images: dict[str, int] | None = None, cpi: int = 3,
                   image_size: int = 8, references: bool = False, extra_refs: int = 2) -> WordMap:
    """Write the tutorial file layout (our REFERENCES file only if ``references``).

    Image ``i`` of a split is filled with the value ``i`` (plus the split's offset); caption row
    ``i*cpi + j`` reads ``img{i} cap{j}`` followed by ``j`` filler words, so every row names its
    image and its position. The REFERENCES file holds ``cpi + extra_refs`` references per image
    and image ids ``1000 + i``.
    """
    num_images = num_images or {"train": 6, "val": 4, "test": 4}
    folder.mkdir(parents=True, exist_ok=True)
    wm = tiny_word_map(max(num_images.values()), cpi)
    wm.save(folder / f"WORDMAP_{name}.json")
    for offset, (split, n) in enumerate(num_images.items()):
        tag = split.upper()
        with h5py.File(folder / f"{tag}_IMAGES_{name}.hdf5", "w") as h5:
            h5.attrs["captions_per_image"] = cpi
            images = h5.create_dataset("images", (n, 3, image_size, image_size), dtype="uint8")
            for i in range(n):
                images[i] = 10 * offset + i
        rows, lens = [], []
        for i in range(n):
            for j in range(cpi):
                words = [f"img{i}", f"cap{j}"] + ["a"] * j
                rows.append(wm.encode(words, MAX_LEN))
                lens.append(len(words) + 2)
        (folder / f"{tag}_CAPTIONS_{name}.json").write_text(json.dumps(rows))
        (folder / f"{tag}_CAPLENS_{name}.json").write_text(json.dumps(lens))
        if references:
            tokens = [[[f"img{i}", f"ref{r}"] for r in range(cpi + extra_refs)] for i in range(n)]
            refs = {"image_ids": [1000 + i for i in range(n)],
                    "paths": [f"x/{i}.jpg" for i in range(n)],
                    "tokens": tokens,
                    "raw": [[" ".join(t).capitalize() + "." for t in ts] for ts in tokens]}
            (folder / f"{tag}_REFERENCES_{name}.json").write_text(json.dumps(refs))
    return wm


@pytest.fixture
def prepared(tmp_path):
    name = data_name()
    wm = write_prepared(tmp_path, name, references=True)
    return tmp_path, name, wm


def test_train_item_keys_dtypes_and_row_pairing(prepared):
    folder, name, wm = prepared
    ds = CaptionH5Dataset(folder, name, "train")
    assert len(ds) == 6 and ds.captions_per_image == 3 and ds.captions_per_sample == 3
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"images", "captions", "lengths", "image_ids"}
        assert item["images"].dtype == torch.uint8 and item["images"].shape == (3, 8, 8)
        assert torch.all(item["images"] == i)
        assert item["captions"].dtype == torch.int64 and item["captions"].shape == (3, T)
        assert item["lengths"].dtype == torch.int64 and item["lengths"].tolist() == [4, 5, 6]
        assert item["image_ids"] == 1000 + i
        for j, row in enumerate(item["captions"].tolist()):
            assert wm.decode(row) == [f"img{i}", f"cap{j}"] + ["a"] * j


def test_val_item_has_all_rows_and_all_references(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "val", captions_per_sample=1)
    item = ds[2]
    assert set(item) == {"images", "captions", "lengths", "image_ids", "references"}
    assert item["captions"].shape == (3, T)  # captions_per_sample ignored outside train
    assert torch.all(item["images"] == 12)  # split offset 10 + index 2
    assert item["references"] == [["img2", f"ref{r}"] for r in range(5)]
    raw = ds.raw_references()
    assert sorted(raw) == [1000, 1001, 1002, 1003]
    assert raw[1002][0] == "Img2 ref0."


@pytest.mark.parametrize("k", [1, 2])
def test_captions_per_sample_picks_distinct_rows_deterministically(prepared, k):
    folder, name, wm = prepared
    ds = CaptionH5Dataset(folder, name, "train", captions_per_sample=k, seed=5)
    other = CaptionH5Dataset(folder, name, "train", captions_per_sample=k, seed=5)
    picks_by_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        picks = []
        for i in range(len(ds)):
            item = ds[i]
            assert item["captions"].shape == (k, T) and item["lengths"].shape == (k,)
            decoded = [wm.decode(r) for r in item["captions"].tolist()]
            assert all(d[0] == f"img{i}" for d in decoded)  # rows of the right image
            caps = [d[1] for d in decoded]
            assert len(set(caps)) == k  # distinct rows
            assert item["lengths"].tolist() == [int(c[3:]) + 4 for c in caps]  # lengths pair up
            assert torch.equal(item["captions"], other[(i, epoch)]["captions"])  # same (seed, epoch)
            picks.append(tuple(caps))
        picks_by_epoch.append(picks)
    assert len(set(map(tuple, picks_by_epoch))) > 1  # the choice changes across epochs
    reseeded = CaptionH5Dataset(folder, name, "train", captions_per_sample=k, seed=6)
    assert [tuple(reseeded[(i, 0)]["captions"].flatten().tolist()) for i in range(6)] != \
        [tuple(other[(i, 0)]["captions"].flatten().tolist()) for i in range(6)]


def test_collate_builds_the_documented_batch(prepared):
    folder, name, _ = prepared
    train = CaptionH5Dataset(folder, name, "train", captions_per_sample=2)
    batch = collate([train[i] for i in (4, 1, 3)])
    assert set(batch) == {"images", "captions", "lengths", "image_ids"}
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, 8, 8)
    assert batch["captions"].dtype == torch.int64 and batch["captions"].shape == (3, 2, T)
    assert batch["lengths"].dtype == torch.int64 and batch["lengths"].shape == (3, 2)
    assert batch["image_ids"].dtype == torch.int64 and batch["image_ids"].tolist() == [1004, 1001, 1003]
    assert torch.equal(batch["captions"][1], train[1]["captions"])

    val = CaptionH5Dataset(folder, name, "val")
    vbatch = collate([val[0], val[1]])
    assert vbatch["captions"].shape == (2, 3, T)
    assert vbatch["references"] == [val[0]["references"], val[1]["references"]]

    with pytest.raises(ValueError, match="mix of train"):
        collate([train[0], val[0]])
    full = CaptionH5Dataset(folder, name, "train")
    with pytest.raises(ValueError, match="same \\(k, T\\)"):
        collate([train[0], full[0]])


def _loader_batches(ds, **kwargs):
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate, **kwargs)
    return list(loader)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_two_workers_return_the_same_batches_as_none(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "val")
    ds[0]  # open the handle in this process first: forked workers must reopen their own
    assert ds._h5 is not None
    _assert_same_batches(_loader_batches(ds, num_workers=0), _loader_batches(ds, num_workers=2))


def test_sampler_epoch_reaches_workers(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "train", captions_per_sample=1, seed=3)
    sampler = EpochAwareSampler(ds, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=2,
                        persistent_workers=True)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        batches = list(loader)
        got = torch.cat([b["captions"] for b in batches])
        expected = torch.stack([ds[(i, epoch)]["captions"] for i in order])
        assert torch.equal(got, expected)
        assert torch.cat([b["image_ids"] for b in batches]).tolist() == [1000 + i for i in order]


def test_sampler_shards_disjointly_across_ranks(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "train")
    shards = []
    for rank in range(2):
        sampler = EpochAwareSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(4)
        pairs = list(sampler)
        assert all(epoch == 4 for _, epoch in pairs) and len(pairs) == 3
        shards.append([i for i, _ in pairs])
    assert sorted(shards[0] + shards[1]) == list(range(6))


@pytest.mark.slow
def test_spawn_workers_return_the_same_batches(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "test")
    ds[1]
    spawned = _loader_batches(ds, num_workers=1, multiprocessing_context="spawn")
    _assert_same_batches(_loader_batches(ds, num_workers=0), spawned)


def test_pickles_before_and_after_first_access(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "val")
    before = pickle.loads(pickle.dumps(ds))
    assert ds._h5 is None and before._h5 is None
    first = ds[3]
    assert ds._h5 is not None
    after = pickle.loads(pickle.dumps(ds))
    assert after._h5 is None  # the handle is not carried along
    for copy in (before, after):
        item = copy[3]
        assert torch.equal(item["images"], first["images"])
        assert torch.equal(item["captions"], first["captions"])
        assert item["references"] == first["references"]
    ds.close()
    assert ds._h5 is None and torch.equal(ds[3]["images"], first["images"])


def test_reopens_when_the_process_changes(prepared):
    folder, name, _ = prepared
    ds = CaptionH5Dataset(folder, name, "train")
    ds[0]
    handle = ds._h5
    ds._h5_pid = -1  # as seen from a forked child
    assert torch.all(ds[5]["images"] == 5)
    assert ds._h5 is not handle and not handle  # the inherited copy was closed, a new one opened


def test_tutorial_layout_without_references_loads(tmp_path):
    name = data_name("flickr8k", cpi=3, min_word_freq=1)
    wm = write_prepared(tmp_path, name, references=False)
    ds = CaptionH5Dataset(tmp_path, name, "test")
    assert not ds.has_reference_file
    item = ds[2]
    assert item["image_ids"] == 2  # the tutorial's image index
    assert item["references"] == [["img2", "cap0"], ["img2", "cap1", "a"], ["img2", "cap2", "a", "a"]]
    assert ds.raw_references()[2] == ["img2 cap0", "img2 cap1 a", "img2 cap2 a a"]
    train = CaptionH5Dataset(tmp_path, name, "train")
    assert [train[i]["image_ids"] for i in range(6)] == list(range(6))
    assert wm.decode(train[3]["captions"][0].tolist()) == ["img3", "cap0"]


def test_missing_files_name_the_expected_paths(tmp_path):
    name = data_name()
    with pytest.raises(FileNotFoundError) as err:
        CaptionH5Dataset(tmp_path, name, "val")
    msg = str(err.value)
    for f in (f"VAL_IMAGES_{name}.hdf5", f"VAL_CAPTIONS_{name}.json", f"VAL_CAPLENS_{name}.json"):
        assert str(tmp_path / f) in msg
    assert "experiment=quickstart" in msg


def test_bad_inputs_give_clear_errors(prepared):
    folder, name, _ = prepared
    with pytest.raises(ValueError, match="lowercase"):
        CaptionH5Dataset(folder, name, "TRAIN")
    with pytest.raises(ValueError, match="captions_per_sample must be in 1..3"):
        CaptionH5Dataset(folder, name, "train", captions_per_sample=4)
    caps = folder / f"TRAIN_CAPTIONS_{name}.json"
    rows = json.loads(caps.read_text())
    caps.write_text(json.dumps(rows[:-1]))
    with pytest.raises(ValueError, match=r"17 rows; expected 6 images x 3 captions = 18"):
        CaptionH5Dataset(folder, name, "train")
    with h5py.File(folder / f"VAL_IMAGES_{name}.hdf5", "a") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete"):
        CaptionH5Dataset(folder, name, "val")
    with pytest.raises(IndexError, match="out of range"):
        CaptionH5Dataset(folder, name, "test")[4]
