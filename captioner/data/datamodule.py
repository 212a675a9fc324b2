"""CaptionDataModule: prepares the tutorial-layout files once and serves the three splits.

Epochs and caption sampling: the train loader's sampler is an
:class:`~captioner.data.dataset.EpochAwareSampler`, a ``DistributedSampler`` that yields
``(index, epoch)``. Lightning keeps it under DDP (it only inserts its own sampler when the
loader has no ``DistributedSampler``) and calls its ``set_epoch`` with the fit loop's epoch at
the start of every epoch. The first epoch a ``fit`` runs is the exception: Lightning creates its
loader iterator before calling ``set_epoch``, and worker processes take their first indices
from the sampler right then, so ``train_dataloader`` builds the sampler already at the fit
loop's upcoming epoch (the restored one after a resume). The shuffling order and the
``captions_per_sample`` row choice of epoch ``e`` are therefore the same in an uninterrupted and
in a resumed run, for any number of (persistent, forked or spawned) workers, and the module
keeps no state of its own to checkpoint. (``Trainer(overfit_batches=...)`` swaps in a plain
sequential sampler; items then use the dataset's own epoch, 0, so the rows stay fixed.)

With ``bucket_by_length=True`` the train sampler is a
:class:`~captioner.data.dataset.LengthBucketSampler` instead: the same ``DistributedSampler``
contract (kept under DDP, ``set_epoch``, ``(index, epoch)`` pairs, order fixed by
``(seed, epoch)``), but each batch holds images of similar longest caption, so the decoder runs
fewer steps per batch. Val and test loaders are never bucketed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from captioner.cider import DocumentFrequencies, cached_document_frequencies
from captioner.data.dataset import (SPLITS, QUICKSTART_HINT, CaptionH5Dataset, EpochAwareSampler,
                                    LengthBucketSampler, collate)
from captioner.data.images import DEFAULT_DRAFT_MIN_RATIO
from captioner.data.preprocess import data_name, split_files, word_map_file
from captioner.vocab import WordMap

log = logging.getLogger(__name__)

DATASETS = ("coco", "flickr8k", "flickr30k", "shapes")
# Where each real dataset's inputs come from, for the error shown when they are missing:
# (what the Karpathy JSON is, the image folders expected under data.image_folder).
SOURCES = {
    "coco": ("Karpathy's splits (dataset_coco.json from caption_datasets.zip)", ("train2014", "val2014")),
    "flickr8k": ("Karpathy's splits (dataset_flickr8k.json from caption_datasets.zip)", ()),
    "flickr30k": ("Karpathy's splits (dataset_flickr30k.json from caption_datasets.zip)", ()),
}


class CaptionDataModule(LightningDataModule):
    """Prepares one dataset (Karpathy JSON + images -> HDF5/JSON) and builds its loaders.

    Args:
        dataset: ``coco``, ``flickr8k``, ``flickr30k`` or ``shapes`` (built-in, synthetic).
        data_folder: where the prepared files go (``WORDMAP_{data_name}.json`` and so on).
        karpathy_json: the Karpathy-split JSON; for ``shapes`` it is generated on first use,
            together with its images, into this file's folder. None (with ``image_folder``):
            no raw inputs, only the prepared files in ``data_folder`` (a converted tutorial
            checkpoint's data, so its folder is never rebuilt), for every dataset.
        image_folder: root the JSON's ``filepath``/``filename`` entries are relative to.
        captions_per_image: caption rows per image in the prepared files (cpi).
        min_word_freq: words seen at least this often in train get an id (``>=``).
        max_len: longest caption in words; rows hold ``max_len + 2`` ids.
        image_size: side of the square images stored in the HDF5 files.
        batch_size: images per training batch (each with ``captions_per_sample`` captions).
        eval_batch_size: images per val/test batch; None means ``batch_size``.
        captions_per_sample: caption rows per training image per epoch (``1..cpi``); None
            means all ``cpi``.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (only when CUDA is available).
        persistent_workers: keep workers between epochs (only with ``num_workers > 0``).
        multiprocessing_context: ``fork``, ``spawn``, ``forkserver`` or None (the default).
        skip_bad_images: preprocessing skips unreadable images instead of failing.
        overwrite: rebuild the prepared files even if they are up to date. Once per instance:
            the first ``prepare_data`` rebuilds, later calls (``train.py`` calls it, then
            Lightning's ``fit`` and ``test`` again) use the rebuilt files. ``"stale"``: rebuild
            only files made with other inputs or settings (``train.py``'s DDP ranks other
            than 0 when ``overwrite`` is true).
        preprocess_workers: processes used to resize images while preprocessing.
        draft_min_ratio: preprocessing decodes JPEGs at 1/2..1/8 scale while that keeps at
            least ``draft_min_ratio * image_size`` pixels per side; None = full decode (see
            :func:`captioner.data.images.load_image`).
        seed: seed of preprocessing, of the train shuffling and of the caption-row choice.
        synthetic: keyword arguments of ``generate_shapes`` (``shapes`` only).
        bucket_by_length: train batches group images of similar longest caption
            (:class:`~captioner.data.dataset.LengthBucketSampler`); False = plain shuffling.
        bucket_pool_batches: batches per length-sorted pool when ``bucket_by_length``.
        train_references: train batches carry every reference of their images (the reward of
            self-critical training; ``train.py`` sets it for ``model.objective=scst``).
    """

    def __init__(self, dataset: str, data_folder: str | os.PathLike, karpathy_json: str | os.PathLike | None,
                 image_folder: str | os.PathLike | None, captions_per_image: int = 5, min_word_freq: int = 5,
                 max_len: int = 50, image_size: int = 256, batch_size: int = 32,
                 eval_batch_size: int | None = None, captions_per_sample: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True,
                 multiprocessing_context: str | None = None, skip_bad_images: bool = False,
                 overwrite: bool | str = False, preprocess_workers: int | None = None,
                 draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO, seed: int = 123,
                 synthetic: Mapping[str, Any] | None = None, bucket_by_length: bool = False,
                 bucket_pool_batches: int = 50, train_references: bool = False):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        if captions_per_sample is not None and not 1 <= captions_per_sample <= captions_per_image:
            raise ValueError(f"data.captions_per_sample must be in 1..{captions_per_image} "
                             f"(data.captions_per_image), got {captions_per_sample}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1),
                           ("bucket_pool_batches", bucket_pool_batches)):
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if synthetic is not None and dataset != "shapes":
            raise ValueError(f"data.synthetic is for dataset=shapes only, got dataset={dataset!r}")
        self.dataset = dataset
        self.data_folder = Path(data_folder)
        if dataset == "shapes" and (karpathy_json is None) != (image_folder is None):
            raise ValueError("data.karpathy_json and data.image_folder say where the shapes "
                             "dataset is generated: set both, or both to null to use only the "
                             "prepared files in data.data_folder")
        self.karpathy_json = Path(karpathy_json) if karpathy_json is not None else None
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.captions_per_image = int(captions_per_image)
        self.min_word_freq = int(min_word_freq)
        self.max_len = int(max_len)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else None
        self.captions_per_sample = captions_per_sample
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.multiprocessing_context = multiprocessing_context
        self.skip_bad_images = bool(skip_bad_images)
        self.overwrite = overwrite if overwrite == "stale" else bool(overwrite)
        self.preprocess_workers = preprocess_workers
        self.draft_min_ratio = draft_min_ratio
        self.seed = int(seed)
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.bucket_by_length = bool(bucket_by_length)
        self.bucket_pool_batches = int(bucket_pool_batches)
        self.train_references = bool(train_references)
        self.datasets: dict[str, CaptionH5Dataset] = {}
        self._word_map: WordMap | None = None
        self._overwritten = False  # data.overwrite is spent once prepare_data has rebuilt

    # ------------------------------------------------------------------ names and files
    @property
    def data_name(self) -> str:
        """``f"{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq"`` (the tutorial's)."""
        return data_name(self.dataset, self.captions_per_image, self.min_word_freq)

    @property
    def word_map_path(self) -> Path:
        return word_map_file(self.data_folder, self.data_name)

    @property
    def word_map(self) -> WordMap:
        """The prepared word map (loaded once; needs ``prepare_data`` to have run)."""
        if self._word_map is None:
            if not self.word_map_path.is_file():
                raise FileNotFoundError(self._missing_message([self.word_map_path]))
            self._word_map = WordMap.load(self.word_map_path)
        return self._word_map

    @property
    def fingerprint(self) -> str | None:
        """The ``fingerprint`` attribute of the prepared TRAIN file (None for tutorial files)."""
        path = split_files(self.data_folder, self.data_name, "train").images
        if not path.is_file():
            return None
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get("fingerprint")
        return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))

    def prepared_files(self) -> list[Path]:
        """Every file the loaders need (the REFERENCES files are optional and not listed)."""
        files = [self.word_map_path]
        for split in SPLITS:
            paths = split_files(self.data_folder, self.data_name, split)
            files += [paths.images, paths.captions, paths.caplens]
        return files

    def _missing_message(self, missing: list[Path]) -> str:
        prepared = set(self.prepared_files())
        raw = [str(p) for p in missing if p not in prepared]
        gone = [p for p in missing if p in prepared]
        lines = [f"Data for dataset={self.dataset!r} is missing:"]
        if raw:
            lines.append(f"raw inputs {raw};")
        if len(gone) == len(prepared):
            lines.append(f"prepared files (WORDMAP_{self.data_name}.json and "
                         f"{{TRAIN,VAL,TEST}}_{{IMAGES,CAPTIONS,CAPLENS}}_{self.data_name}.*) "
                         f"in {self.data_folder}.")
        elif gone:
            lines.append(f"prepared files {[str(p) for p in gone]}.")
        if self.karpathy_json is None or self.image_folder is None:
            lines.append(f"data.karpathy_json/data.image_folder are null, so only prepared files are "
                         f"used: point data.data_folder at the folder holding them (now "
                         f"{self.data_folder}).")
        elif self.dataset in SOURCES:
            what, subfolders = SOURCES[self.dataset]
            folders = [str(self.image_folder / sub) for sub in subfolders] or [str(self.image_folder)]
            lines.append(
                f"To prepare it, put {what} at {self.karpathy_json} (data.karpathy_json) and the "
                f"images in {folders} (data.image_folder={self.image_folder}), or point "
                f"data.data_folder at a folder already holding the prepared files (the tutorial's "
                f"output works unchanged). See data/README.md.")
        lines.append(QUICKSTART_HINT)
        return " ".join(lines)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Generate ``shapes`` if needed and write the prepared files (idempotent).

        Preprocessing runs whenever the raw inputs exist; it returns early when its outputs are
        up to date. Without raw inputs, files prepared earlier (ours or the tutorial's) are
        used as they are. ``overwrite`` applies to the first call only: once that call has
        rebuilt the files, later calls on this instance treat them as up to date.

        Raises:
            FileNotFoundError: neither the raw inputs nor the prepared files exist; the message
                names the expected paths.
        """
        if self.dataset == "shapes" and self.karpathy_json is not None:
            from captioner.data.shapes import generate_shapes

            generated = generate_shapes(self.karpathy_json.parent, **(self.synthetic or {}))
            if Path(generated).resolve() != self.karpathy_json.resolve():
                raise ValueError(f"generate_shapes wrote {generated}, but data.karpathy_json is "
                                 f"{self.karpathy_json}; set it to {generated}")
        overwrite = False if self._overwritten else self.overwrite
        raw_present = (self.karpathy_json is not None and self.image_folder is not None
                       and self.karpathy_json.is_file() and self.image_folder.is_dir())
        if not raw_present:
            missing = [p for p in self.prepared_files() if not p.is_file()]
            if missing or overwrite is True:
                raw = [p for p in (self.karpathy_json, self.image_folder) if p is not None and not p.exists()]
                raise FileNotFoundError(self._missing_message(raw + missing))
            log.info("Raw data for %s not found; using the prepared files in %s",
                     self.dataset, self.data_folder)
            return
        from captioner.data.preprocess import create_input_files

        create_input_files(
            dataset=self.dataset, karpathy_json_path=self.karpathy_json,
            image_folder=self.image_folder, captions_per_image=self.captions_per_image,
            min_word_freq=self.min_word_freq, output_folder=self.data_folder, max_len=self.max_len,
            image_size=self.image_size, num_workers=self.preprocess_workers,
            draft_min_ratio=self.draft_min_ratio,
            skip_bad_images=self.skip_bad_images, overwrite=overwrite, seed=self.seed)
        if overwrite:
            self._overwritten = True

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs: fit -> train, val; validate -> val; test/predict -> test."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage, SPLITS) if stage is not None else SPLITS
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._build_dataset(split)

    def _build_dataset(self, split: str) -> CaptionH5Dataset:
        paths = split_files(self.data_folder, self.data_name, split)
        missing = [p for p in (paths.images, paths.captions, paths.caplens) if not p.is_file()]
        if missing:
            raise FileNotFoundError(self._missing_message(missing) + " Run prepare_data() first.")
        return CaptionH5Dataset(self.data_folder, self.data_name, split,
                                captions_per_sample=self.captions_per_sample if split == "train" else None,
                                seed=self.seed,
                                with_references=self.train_references if split == "train" else True)

    def _dataset(self, split: str) -> CaptionH5Dataset:
        if split not in self.datasets:
            self.datasets[split] = self._build_dataset(split)
        return self.datasets[split]

    def _loader(self, dataset: CaptionH5Dataset, batch_size: int, sampler=None) -> DataLoader:
        workers = self.num_workers > 0
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, sampler=sampler, drop_last=False,
            collate_fn=collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers,
            multiprocessing_context=self.multiprocessing_context if workers else None)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch (seeded by ``seed + epoch``), sharded across DDP ranks.

        With ``bucket_by_length`` the batches are length-bucketed (see the module docstring).
        """
        dataset = self._dataset("train")
        trainer = self.trainer
        num_replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if self.bucket_by_length:
            # Its chunks of batch_size are the bucketed batches: _loader uses the same
            # batch_size and drop_last=False.
            sampler = LengthBucketSampler(dataset, dataset.max_caption_lengths,
                                          batch_size=self.batch_size, num_replicas=num_replicas,
                                          rank=rank, shuffle=True, seed=self.seed,
                                          drop_last=False, pool_batches=self.bucket_pool_batches)
        else:
            sampler = EpochAwareSampler(dataset, num_replicas=num_replicas, rank=rank,
                                        shuffle=True, seed=self.seed, drop_last=False)
        sampler.set_epoch(self._upcoming_epoch())
        return self._loader(dataset, self.batch_size, sampler)

    def _upcoming_epoch(self) -> int:
        """The epoch the fit loop runs next: the one Lightning passes to ``set_epoch`` later.

        Lightning creates the loader's iterator right after this loader is built, before it calls
        ``set_epoch``, and on a resume it uses that iterator for the first resumed epoch. With
        ``num_workers > 0`` the iterator takes its first ``prefetch_factor * num_workers`` batches
        of indices from the sampler at creation, which fixes the whole epoch's order (and each
        item's epoch) then; a sampler still at epoch 0 would replay epoch 0's order and caption
        rows in the resumed epoch. So the sampler starts at the fit loop's epoch: 0 in a fresh
        run, ``e + 1`` after resuming a checkpoint written at the end of epoch ``e``, ``e`` after
        one written inside epoch ``e``.
        """
        trainer = self.trainer
        fit_loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
        if fit_loop is None:
            return 0
        return int(fit_loop.epoch_progress.current.processed)

    def val_dataloader(self) -> DataLoader:
        """In file order, ``eval_batch_size`` (or ``batch_size``) images per batch."""
        return self._loader(self._dataset("val"), self.eval_batch_size or self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """In file order, ``eval_batch_size`` (or ``batch_size``) images per batch."""
        return self._loader(self._dataset("test"), self.eval_batch_size or self.batch_size)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move a batch to ``device``, except the caption lengths.

        The decoder reads the lengths on the host (its per-step batch sizes). Left there, they
        cost no host sync per step, and :class:`~captioner.models.Captioner` copies them to the
        device without waiting. Lightning uses this hook when the Trainer is given this data
        module (``train.py``); with plain dataloaders (``evaluate.py``) the lengths go to the
        device and the decoder reads them back once per batch.
        """
        if isinstance(batch, dict) and isinstance(batch.get("lengths"), torch.Tensor):
            rest = super().transfer_batch_to_device(
                {k: v for k, v in batch.items() if k != "lengths"}, device, dataloader_idx)
            return {**rest, "lengths": batch["lengths"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @property
    def cider_document_frequencies_path(self) -> Path:
        return self.data_folder / f"TRAIN_CIDER_DF_{self.data_name}.npz"

    def cider_document_frequencies(self) -> DocumentFrequencies:
        """CIDEr-D document frequencies of the train split's references, in word-map ids (rare
        words as ``<unk>``, as the model sees them): the SCST reward's. Computed once and cached
        in :attr:`cider_document_frequencies_path`, keyed by a hash of those references, so it
        is recomputed when they (or the word map) change."""
        dataset = self._dataset("train")
        if not dataset.with_references:
            dataset = CaptionH5Dataset(self.data_folder, self.data_name, "train", seed=self.seed,
                                       with_references=True)
        word_map = self.word_map
        references = [[[word_map.id_of(w) for w in ref] for ref in refs] for refs in dataset.references]
        return cached_document_frequencies(self.cider_document_frequencies_path, references)

    def raw_references(self, split: str) -> dict[int, list[str]]:
        """``{image_id: [raw caption strings]}`` of a split (for the COCO scorers)."""
        return self._dataset(split).raw_references()

    def teardown(self, stage: str | None = None) -> None:
        for dataset in self.datasets.values():
            dataset.close()
