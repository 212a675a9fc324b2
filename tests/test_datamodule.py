"""CaptionDataModule: prepared data, loaders, epochs under Lightning, errors, configs, shapes end to end."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from captioner.data.dataset import EpochAwareSampler, LengthBucketSampler
from captioner.data.datamodule import CaptionDataModule
from captioner.vocab import WordMap
from test_dataset import T, data_name, write_caplens, write_prepared

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def make_dm(tmp_path: Path, **kwargs) -> CaptionDataModule:
    args = dict(dataset="coco", data_folder=tmp_path / "prepared",
                karpathy_json=tmp_path / "raw" / "dataset_coco.json", image_folder=tmp_path / "raw" / "images",
                captions_per_image=3, min_word_freq=1, max_len=6, image_size=8, batch_size=4,
                num_workers=0, seed=7)
    args.update(kwargs)
    return CaptionDataModule(**args)


@pytest.fixture
def prepared_dm(tmp_path):
    wm = write_prepared(tmp_path / "prepared", data_name("coco", 3, 1), references=True,
                        num_images={"train": 10, "val": 6, "test": 5})
    return make_dm(tmp_path, eval_batch_size=4), wm


def test_batches_move_to_the_device_except_the_caption_lengths(tmp_path):
    """The decoder reads lengths on the host: Lightning's transfer leaves them there."""
    batch = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
             "captions": torch.zeros(2, 3, 7, dtype=torch.long),
             "lengths": torch.full((2, 3), 3), "image_ids": torch.tensor([4, 9]),
             "references": [[["a"]], [["b"]]]}
    moved = make_dm(tmp_path).transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert {k: v.device.type for k, v in moved.items() if torch.is_tensor(v)} == {
        "images": "meta", "captions": "meta", "image_ids": "meta", "lengths": "cpu"}
    assert moved["lengths"] is batch["lengths"] and moved["references"] == batch["references"]


def test_names_word_map_and_prepared_tutorial_files(prepared_dm, tmp_path):
    dm, wm = prepared_dm
    assert dm.data_name == "coco_3_cap_per_img_1_min_word_freq"
    assert dm.word_map_path == tmp_path / "prepared" / "WORDMAP_coco_3_cap_per_img_1_min_word_freq.json"
    dm.prepare_data()  # no raw inputs, but the prepared files are complete: used as they are
    assert dm.word_map == wm
    assert dm.fingerprint is None  # hand-written (tutorial-like) files carry none


def test_loaders_batch_shapes_and_order(prepared_dm):
    dm, _ = prepared_dm
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    train = list(dm.train_dataloader())
    assert [b["images"].shape[0] for b in train] == [4, 4, 2]  # drop_last=False
    ids = torch.cat([b["image_ids"] for b in train]).tolist()
    assert sorted(ids) == [1000 + i for i in range(10)] and ids != sorted(ids)  # shuffled, complete
    assert train[0]["captions"].shape == (4, 3, T) and "references" not in train[0]

    val = list(dm.val_dataloader())
    assert torch.cat([b["image_ids"] for b in val]).tolist() == [1000 + i for i in range(6)]
    assert val[0]["captions"].shape == (4, 3, T) and len(val[0]["references"]) == 4
    dm.setup("test")
    test = list(dm.test_dataloader())
    assert [b["images"].shape[0] for b in test] == [4, 1]
    assert sorted(dm.raw_references("test")) == [1000 + i for i in range(5)]


def test_train_loader_shards_across_ranks(prepared_dm):
    dm, _ = prepared_dm
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        seen.append(torch.cat([b["image_ids"] for b in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(seen[0] + seen[1]) == [1000 + i for i in range(10)]


# Longest caption per train image 0..9: sorted 3 3 3 3 | 5 5 5 8 | 8 8 in batches of 4.
BUCKET_KEYS = [3, 8, 3, 5, 8, 3, 5, 8, 5, 3]


@pytest.fixture
def bucketed_dm(tmp_path):
    folder, name = tmp_path / "prepared", data_name("coco", 3, 1)
    write_prepared(folder, name, references=True, num_images={"train": 10, "val": 2, "test": 2})
    write_caplens(folder, name, "train", [[2, key, 3] for key in BUCKET_KEYS])
    return make_dm(tmp_path, bucket_by_length=True, num_workers=2, persistent_workers=False)


def _batch_keys(batch) -> tuple[int, ...]:
    return tuple(sorted(batch["lengths"].max(dim=1).values.tolist()))


def test_bucketed_train_loader_groups_similar_lengths(bucketed_dm):
    plain = make_dm(bucketed_dm.data_folder.parent).train_dataloader().sampler
    assert type(plain) is EpochAwareSampler  # off by default
    loader = bucketed_dm.train_dataloader()
    assert isinstance(loader.sampler, LengthBucketSampler)
    assert loader.sampler.batch_size == loader.batch_size == 4 and not loader.drop_last
    orders = []
    for epoch in (0, 1, 2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert [_batch_keys(b) for b in batches][-1] == (8, 8)  # the partial batch stays last
        assert sorted(map(_batch_keys, batches)) == [(3, 3, 3, 3), (5, 5, 5, 8), (8, 8)]
        ids = torch.cat([b["image_ids"] for b in batches]).tolist()
        assert sorted(ids) == [1000 + i for i in range(10)]
        orders.append(ids)
    assert len(set(map(tuple, orders))) > 1  # reshuffled across epochs


def test_bucketed_train_loader_shards_neighbouring_lengths_across_ranks(bucketed_dm):
    per_rank = []
    for rank in range(2):
        bucketed_dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = bucketed_dm.train_dataloader()
        loader.sampler.set_epoch(1)
        per_rank.append(list(loader))
    assert [len(b["image_ids"]) for b in per_rank[0]] == [4, 1]  # global batches of 8, then 2
    assert [len(b["image_ids"]) for b in per_rank[1]] == [4, 1]
    ids = [torch.cat([b["image_ids"] for b in batches]).tolist() for batches in per_rank]
    assert sorted(ids[0] + ids[1]) == [1000 + i for i in range(10)]
    for step in range(2):  # one sorted global batch per step: rank 0's keys <= rank 1's
        assert max(_batch_keys(per_rank[0][step])) <= min(_batch_keys(per_rank[1][step]))


def test_fit_keeps_the_bucket_sampler_and_its_epochs(bucketed_dm, tmp_path):
    model = _fit(bucketed_dm, tmp_path / "fit", max_epochs=2)
    sampler = LengthBucketSampler(range(10), BUCKET_KEYS, batch_size=4, seed=bucketed_dm.seed)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = [1000 + i for i, _ in sampler]
        assert [i for e, i, _ in model.seen if e == epoch] == expected


class _Recorder(pl.LightningModule):
    """Records (epoch, image id, caption rows) of every training item."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, tuple]] = []

    def training_step(self, batch, batch_idx):
        for image_id, rows in zip(batch["image_ids"].tolist(), batch["captions"].tolist()):
            self.seen.append((self.current_epoch, image_id, tuple(map(tuple, rows))))
        return (self.weight * batch["images"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, root: Path, max_epochs: int, ckpt_path=None) -> _Recorder:
    model = _Recorder()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=True, default_root_dir=root, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("loader", [
    dict(num_workers=2, persistent_workers=True),  # the configs' default
    dict(num_workers=2, persistent_workers=False),
    dict(num_workers=1, persistent_workers=True, bucket_by_length=True),
    dict(num_workers=0),
])
def test_fit_resamples_captions_each_epoch_and_resume_is_exact(tmp_path, loader):
    """A resumed fit sees the uninterrupted fit's items, epoch by epoch, with any loader.

    With workers, Lightning creates the first epoch's iterator (whose workers take indices from
    the sampler at once) before it calls ``set_epoch``: the sampler must already be at the
    resumed epoch then.
    """
    write_prepared(tmp_path / "prepared", data_name("coco", 3, 1), references=True,
                   num_images={"train": 8, "val": 2, "test": 2})
    dm = make_dm(tmp_path, captions_per_sample=1, **loader)
    full = _fit(dm, tmp_path / "a", max_epochs=3).seen
    dataset = dm.datasets["train"]
    by_epoch = {e: {i: rows for ep, i, rows in full if ep == e} for e in range(3)}
    for epoch, items in by_epoch.items():
        assert len(items) == 8
        for image_id, rows in items.items():  # the dataset's choice for (seed, epoch, index)
            assert rows == tuple(map(tuple, dataset[(image_id - 1000, epoch)]["captions"].tolist()))
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    order = [[i for ep, i, _ in full if ep == e] for e in range(3)]
    assert order[0] != order[1]  # reshuffled each epoch

    first = _fit(make_dm(tmp_path, captions_per_sample=1, **loader), tmp_path / "b", max_epochs=1)
    assert first.seen == [s for s in full if s[0] < 1]
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = _fit(make_dm(tmp_path, captions_per_sample=1, **loader), tmp_path / "b", max_epochs=3,
                   ckpt_path=ckpt)
    assert resumed.seen == [s for s in full if s[0] >= 1]


def test_missing_coco_names_expected_files_and_quickstart(tmp_path):
    dm = CaptionDataModule(dataset="coco", data_folder=tmp_path / "coco" / "prepared",
                           karpathy_json=tmp_path / "coco" / "dataset_coco.json",
                           image_folder=tmp_path / "coco" / "images")
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    for expected in ("coco/dataset_coco.json", "coco/images/train2014", "coco/images/val2014",
                     "experiment=quickstart", str(tmp_path / "coco" / "prepared")):
        assert expected in msg, expected
    with pytest.raises(FileNotFoundError, match="TRAIN_IMAGES_coco_5_cap_per_img_5_min_word_freq.hdf5"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="experiment=quickstart"):
        dm.word_map


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="data.dataset must be one of"):
        make_dm(tmp_path, dataset="imagenet")
    with pytest.raises(ValueError, match="captions_per_sample must be in 1..3"):
        make_dm(tmp_path, captions_per_sample=5)
    with pytest.raises(ValueError, match="synthetic is for dataset=shapes"):
        make_dm(tmp_path, synthetic={"num_train": 3})
    with pytest.raises(ValueError, match="data.bucket_pool_batches must be >= 1, got 0"):
        make_dm(tmp_path, bucket_by_length=True, bucket_pool_batches=0)


def _constructor_args() -> set[str]:
    return set(inspect.signature(CaptionDataModule.__init__).parameters) - {"self"}


@pytest.mark.parametrize("name", ["coco", "flickr8k", "flickr30k", "shapes"])
def test_data_configs_instantiate(name, tmp_path):
    from hydra.utils import instantiate

    data_cfg = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    assert set(data_cfg) - {"_target_"} == _constructor_args()
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data_cfg})
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, CaptionDataModule) and dm.dataset == name
    assert dm.data_folder == tmp_path / name / "prepared"
    assert dm.karpathy_json == tmp_path / name / f"dataset_{name}.json"
    expected = {"coco": (5, 6, 50, 256), "flickr8k": (5, 6, 50, 256), "flickr30k": (5, 6, 50, 256),
                "shapes": (5, 1, 20, 64)}[name]
    assert (dm.captions_per_image, dm.min_word_freq, dm.max_len, dm.image_size) == expected
    if name == "shapes":
        assert dm.synthetic == {"num_train": 4000, "num_val": 500, "num_test": 500,
                                "image_size": 64, "seed": 0}
        assert dm.num_workers == 2


def test_prepare_data_on_generated_shapes(tmp_path):
    root = tmp_path / "shapes"
    dm = CaptionDataModule(dataset="shapes", data_folder=root / "prepared",
                           karpathy_json=root / "dataset_shapes.json", image_folder=root,
                           captions_per_image=5, min_word_freq=1, max_len=20, image_size=64,
                           batch_size=16, captions_per_sample=2, num_workers=0, preprocess_workers=0,
                           synthetic={"num_train": 200, "num_val": 40, "num_test": 40,
                                      "image_size": 64, "seed": 0})
    dm.prepare_data()
    hdf5 = root / "prepared" / f"TRAIN_IMAGES_{dm.data_name}.hdf5"
    stamp = hdf5.stat().st_mtime_ns
    dm.prepare_data()  # idempotent: nothing rewritten
    assert hdf5.stat().st_mtime_ns == stamp
    assert dm.fingerprint and isinstance(dm.word_map, WordMap)

    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 200, "val": 40, "test": 40}
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (16, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["captions"].shape == (16, 2, 22) and batch["lengths"].shape == (16, 2)
    assert torch.all(batch["captions"][:, :, 0] == dm.word_map.start_id)

    entries = {e["imgid"]: e for e in json.loads((root / "dataset_shapes.json").read_text())["images"]}
    val = next(iter(dm.val_dataloader()))
    for image_id, refs, rows in zip(val["image_ids"].tolist(), val["references"], val["captions"]):
        assert entries[image_id]["split"] == "val"
        assert refs == [s["tokens"] for s in entries[image_id]["sentences"]]
        for row in rows.tolist():  # every caption row is one of the image's references
            assert dm.word_map.decode(row) in refs
    raw = dm.raw_references("val")
    assert raw[image_id] == [s["raw"] for s in entries[image_id]["sentences"]]


def test_overwrite_rebuilds_once_per_instance(tmp_path, monkeypatch):
    """data.overwrite=true: one train.py run calls prepare_data three times (run.py, then
    Lightning's fit and test); only the first rebuilds. A new instance (a new run) rebuilds."""
    import captioner.data.preprocess as pp
    from test_preprocess import make_dataset

    json_path, folder = make_dataset(tmp_path / "raw")
    builds = []
    build = pp._build
    monkeypatch.setattr(pp, "_build", lambda *args: builds.append(1) or build(*args))
    settings = dict(karpathy_json=json_path, image_folder=folder, max_len=8, image_size=8,
                    preprocess_workers=0)
    make_dm(tmp_path, **settings).prepare_data()
    dm = make_dm(tmp_path, overwrite=True, **settings)
    train = tmp_path / "prepared" / f"TRAIN_IMAGES_{dm.data_name}.hdf5"
    before = train.stat().st_ino
    dm.prepare_data()
    rebuilt = train.stat().st_ino
    assert len(builds) == 2 and rebuilt != before  # renamed into place: a new inode
    dm.prepare_data()
    dm.prepare_data()
    assert len(builds) == 2 and train.stat().st_ino == rebuilt
    assert dm.overwrite  # the setting itself is unchanged
    make_dm(tmp_path, overwrite=True, **settings).prepare_data()
    assert len(builds) == 3


def test_stale_overwrite_keeps_matching_files_and_rebuilds_other_settings(tmp_path, monkeypatch):
    """overwrite="stale" (train.py's DDP ranks other than 0 under data.overwrite=true): files
    prepared with these settings are used as they are; files of other settings are rebuilt
    instead of refused, whichever rank takes the lock first."""
    import captioner.data.preprocess as pp
    from test_preprocess import make_dataset

    json_path, folder = make_dataset(tmp_path / "raw")
    builds = []
    build = pp._build
    monkeypatch.setattr(pp, "_build", lambda *args: builds.append(1) or build(*args))
    settings = dict(karpathy_json=json_path, image_folder=folder, max_len=8, preprocess_workers=0)
    make_dm(tmp_path, image_size=8, **settings).prepare_data()
    make_dm(tmp_path, image_size=8, overwrite="stale", **settings).prepare_data()
    assert len(builds) == 1
    with pytest.raises(ValueError, match="overwrite=True"):
        make_dm(tmp_path, image_size=12, **settings).prepare_data()
    dm = make_dm(tmp_path, image_size=12, overwrite="stale", **settings)
    dm.prepare_data()
    assert len(builds) == 2 and dm.word_map is not None
    with h5py.File(tmp_path / "prepared" / f"TRAIN_IMAGES_{dm.data_name}.hdf5", "r") as h5:
        assert h5["images"].shape[-1] == 12
    with pytest.raises(ValueError, match="overwrite must be true, false or 'stale'"):
        pp.create_input_files("x", json_path, folder, 1, 1, tmp_path / "other", overwrite="yes")


def test_null_raw_paths_use_prepared_files_and_say_so_when_missing(tmp_path):
    """karpathy_json/image_folder null (a converted tutorial checkpoint's data): nothing is
    prepared; missing prepared files are named, with data.data_folder as the fix."""
    dm = make_dm(tmp_path, karpathy_json=None, image_folder=None)
    with pytest.raises(FileNotFoundError, match=r"WORDMAP_.*are null, so only prepared files are used: "
                                                r"point data.data_folder"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="set both, or both to null"):
        make_dm(tmp_path, dataset="shapes", karpathy_json=None)
    shapes = make_dm(tmp_path, dataset="shapes", karpathy_json=None, image_folder=None)
    with pytest.raises(FileNotFoundError, match=r"WORDMAP_shapes_3_cap.*are null, so only prepared"):
        shapes.prepare_data()  # nothing generated
    assert not (tmp_path / "dataset_shapes.json").exists() and not (tmp_path / "prepared").exists()

