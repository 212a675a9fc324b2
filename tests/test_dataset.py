"""CaptionH5Dataset, its samplers (EpochAwareSampler, LengthBucketSampler) and collate on tiny
tutorial-layout files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from captioner.data.dataset import CaptionH5Dataset, EpochAwareSampler, LengthBucketSampler, collate
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


def write_caplens(folder: Path, name: str, split: str, lengths: list[list[int]]) -> None:
    """Overwrite a split's CAPLENS file: ``lengths[i][j]`` is the length of row ``i*cpi + j``."""
    rows = [length for per_image in lengths for length in per_image]
    (folder / f"{split.upper()}_CAPLENS_{name}.json").write_text(json.dumps(rows))


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


def test_max_caption_lengths_take_the_longest_row_per_image(prepared):
    folder, name, _ = prepared
    lengths = [[3, 8, 2], [5, 5, 5], [2, 2, 7], [6, 4, 3], [2, 2, 2], [4, 8, 8]]
    write_caplens(folder, name, "train", lengths)
    ds = CaptionH5Dataset(folder, name, "train", captions_per_sample=1)
    keys = ds.max_caption_lengths
    assert keys.dtype == np.int64 and keys.shape == (6,)
    assert keys.tolist() == [8, 5, 7, 6, 2, 8]
    for i in range(6):  # an upper bound of whatever rows an epoch picks
        assert all(int(ds[(i, e)]["lengths"].max()) <= keys[i] for e in range(3))


def _bucket_streams(lengths, num_replicas: int, epoch: int = 0, **kwargs) -> list[list[tuple]]:
    """The (index, epoch) pairs every rank yields in ``epoch``."""
    dataset = range(len(lengths))
    streams = []
    for rank in range(num_replicas):
        sampler = LengthBucketSampler(dataset, lengths, num_replicas=num_replicas, rank=rank,
                                      **kwargs)
        sampler.set_epoch(epoch)
        streams.append(list(sampler))
        assert len(sampler) == sampler.num_samples == len(streams[-1])
    return streams


@pytest.mark.parametrize("n, num_replicas, drop_last", [
    (64, 1, False), (37, 1, False), (37, 2, False), (37, 3, False), (37, 3, True), (5, 4, False),
    (2, 3, False)])
def test_bucket_sampler_covers_what_the_distributed_sampler_covers(n, num_replicas, drop_last):
    rng = np.random.default_rng(n)
    lengths = rng.integers(4, 30, n)
    streams = _bucket_streams(lengths, num_replicas, epoch=5, batch_size=4, seed=2,
                              drop_last=drop_last, pool_batches=2)
    expected = []
    for rank in range(num_replicas):
        plain = DistributedSampler(range(n), num_replicas=num_replicas, rank=rank, seed=2,
                                   drop_last=drop_last)
        plain.set_epoch(5)
        expected += list(plain)
        assert len(streams[rank]) == plain.num_samples  # every rank the same number of items
    assert all(epoch == 5 for stream in streams for _, epoch in stream)
    assert sorted(i for stream in streams for i, _ in stream) == sorted(expected)  # same padding


def test_bucket_sampler_is_deterministic_per_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(4, 30, 200)
    kwargs = dict(batch_size=8, seed=4, pool_batches=3)
    first = _bucket_streams(lengths, 2, epoch=1, **kwargs)
    assert first == _bucket_streams(lengths, 2, epoch=1, **kwargs)
    assert first != _bucket_streams(lengths, 2, epoch=2, **kwargs)
    assert first != _bucket_streams(lengths, 2, epoch=1, **{**kwargs, "seed": 5})


@pytest.mark.parametrize("num_replicas, batch_size", [(1, 8), (2, 4)])
def test_bucket_sampler_batches_are_homogeneous(num_replicas, batch_size):
    lengths = np.repeat([3, 7, 11], 32)  # every value fills whole global batches of 8
    np.random.default_rng(0).shuffle(lengths)
    streams = _bucket_streams(lengths, num_replicas, batch_size=batch_size, pool_batches=100)
    for stream in streams:
        keys = lengths[[i for i, _ in stream]]
        chunks = keys.reshape(-1, batch_size)  # the DataLoader's batches
        assert all(len(set(chunk)) == 1 for chunk in chunks)
        assert len(set(chunks[:, 0])) == 3 and not np.all(np.diff(chunks[:, 0]) >= 0)  # shuffled


def test_bucket_sampler_needs_fewer_decoder_steps_than_plain_shuffling():
    rng = np.random.default_rng(3)
    lengths = np.clip(np.round(rng.normal(11.5, 2.5, (640, 5))), 1, 50).max(axis=1) + 2
    bucketed = [lengths[[i for i, _ in s]] for s in _bucket_streams(lengths, 1, batch_size=32)]
    plain = EpochAwareSampler(range(640), seed=0)
    shuffled = lengths[[i for i, _ in plain]]
    steps = [int(keys.reshape(-1, 32).max(axis=1).sum()) for keys in (bucketed[0], shuffled)]
    assert steps[0] < steps[1] - 2 * 20  # 20 batches, >= 2 steps fewer each (338 vs 405)


def test_bucket_sampler_ranks_share_one_sorted_global_batch_per_step():
    lengths = np.random.default_rng(2).integers(4, 30, 75)
    sampler = LengthBucketSampler(range(75), lengths, batch_size=4, num_replicas=2, rank=0,
                                  seed=1, pool_batches=3)
    sampler.set_epoch(3)
    batches = sampler.global_batches()
    assert sum(map(len, batches)) == sampler.total_size == 76
    assert [len(b) for b in batches] == [8] * 9 + [4]  # the partial batch stays last
    streams = _bucket_streams(lengths, 2, epoch=3, batch_size=4, seed=1, pool_batches=3)
    indices = [np.array([i for i, _ in s]) for s in streams]
    steps = [np.split(ix, [4 * k for k in range(1, 10)]) for ix in indices]  # 9 of 4, 1 of 2
    for step, batch in enumerate(batches):
        assert np.array_equal(np.concatenate([steps[0][step], steps[1][step]]), batch)
        keys = lengths[batch]
        assert np.all(np.diff(keys) >= 0)  # so rank 0's keys <= rank 1's at every step
        assert lengths[steps[0][step]].max() <= lengths[steps[1][step]].min()


def test_bucket_sampler_without_shuffle_is_a_stable_sort_per_pool():
    lengths = np.random.default_rng(5).integers(4, 9, 40)
    sampler = LengthBucketSampler(range(40), lengths, batch_size=4, shuffle=False,
                                  pool_batches=5)
    order = np.array([i for i, _ in sampler])
    for start in (0, 20):  # two pools of 5 batches of 4
        pool = np.arange(start, start + 20)
        stable = pool[np.argsort(lengths[pool], kind="stable")]
        assert np.array_equal(order[start:start + 20], stable)


def test_bucket_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"lengths must hold one number per item .*\(10,\)"):
        LengthBucketSampler(range(10), [5] * 9, batch_size=2)
    with pytest.raises(ValueError, match="lengths must hold one number"):
        LengthBucketSampler(range(2), ["a", "b"], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        LengthBucketSampler(range(3), [5, 6, 7], batch_size=0)
    with pytest.raises(ValueError, match="pool_batches must be >= 1, got 0"):
        LengthBucketSampler(range(3), [5, 6, 7], batch_size=2, pool_batches=0)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler(range(3), [5, 6, 7], batch_size=2, num_replicas=2, rank=2)


def test_bucket_sampler_epoch_reaches_workers(prepared):
    folder, name, _ = prepared
    write_caplens(folder, name, "train", [[3, 8, 2], [5, 5, 5], [2, 2, 7], [6, 4, 3],
                                          [2, 2, 2], [4, 8, 8]])
    ds = CaptionH5Dataset(folder, name, "train", captions_per_sample=1, seed=3)
    sampler = LengthBucketSampler(ds, ds.max_caption_lengths, batch_size=2, seed=3)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        batches = list(loader)
        expected = torch.stack([ds[(i, epoch)]["captions"] for i in order])
        assert torch.equal(torch.cat([b["captions"] for b in batches]), expected)
        keys = sorted(tuple(sorted(ds.max_caption_lengths[[i - 1000 for i in b["image_ids"]]]))
                      for b in batches)
        assert keys == [(2, 5), (6, 7), (8, 8)]  # the sorted keys 2 5 | 6 7 | 8 8, in some order


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
