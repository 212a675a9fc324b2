"""CaptionH5Dataset (one item per image, HDF5 opened lazily per process), its sampler and collate.

Reads the tutorial's file layout (see docs/architecture.md) for
``name = f"{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq"`` in ``data_folder``:
``{SPLIT}_IMAGES_{name}.hdf5``, ``{SPLIT}_CAPTIONS_{name}.json``, ``{SPLIT}_CAPLENS_{name}.json``,
and for val/test ``{SPLIT}_REFERENCES_{name}.json`` when present (files prepared by the
tutorial lack it; see :class:`CaptionH5Dataset`).

The batch dict (the only contract between data and lit_module), built by :func:`collate`:

============  ===========================  ====================================================
key           train                        val / test
============  ===========================  ====================================================
images        uint8 (B, 3, S, S)           uint8 (B, 3, S, S)
captions      int64 (B, k, T)              int64 (B, cpi, T)
lengths       int64 (B, k)                 int64 (B, cpi)
references    absent (see below)           list of B lists of token lists (no special tokens)
image_ids     int64 (B,)                   int64 (B,)
============  ===========================  ====================================================

Train batches carry ``references`` too when the dataset is built with ``with_references=True``
(``CaptionDataModule(train_references=True)``, which self-critical training needs for its reward).

``T = max_len + 2`` is fixed by the files: trailing all-pad columns are NOT trimmed per
batch, so every batch of a split has the same T. The model uses ``lengths`` and masks, so the
extra padding costs a little compute and nothing else. Images stay uint8; the model
normalises them on its device.

Sampling ``k < cpi`` caption rows per training image is deterministic: the rows of image
``i`` in epoch ``e`` are ``sorted(numpy.random.default_rng([seed, e, i]).permutation(cpi)[:k])``.
The epoch reaches the worker processes inside the index: :class:`EpochAwareSampler` yields
``(index, epoch)`` pairs, so it works with any number of (persistent) workers and with the
``spawn`` start method. :meth:`CaptionH5Dataset.set_epoch` sets the epoch used for plain
integer indices. :class:`LengthBucketSampler` is the same with batches of similar caption
length (keyed by :attr:`CaptionH5Dataset.max_caption_lengths`), for fewer decoder steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from captioner.data.karpathy import SPLITS
from captioner.data.preprocess import split_files, word_map_file
from captioner.vocab import WordMap

QUICKSTART_HINT = ("For the built-in synthetic data, run `python train.py experiment=quickstart` "
                   "(it generates and prepares everything under data/shapes).")


def _load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and prepare the data "
                         f"again (CaptionDataModule.prepare_data with overwrite=True)") from None


class CaptionH5Dataset(Dataset):
    """The images of one split with their caption rows; one item per image.

    The HDF5 file is opened lazily, on first item access, in whichever process reads it, and
    reopened when the process id changes (DataLoader workers, fork or spawn). ``__init__`` only
    opens it briefly to read its shape and attributes and closes it again, and pickling drops
    any open handle, so the object can be sent to workers before or after first use.

    Items (see the module docstring for the batch form):

    - train: ``{"images": uint8 (3, S, S), "captions": int64 (k, T), "lengths": int64 (k,),
      "image_ids": int}`` with ``k = captions_per_sample`` rows of this image (all ``cpi`` when
      None); with ``k < cpi`` the rows are chosen by ``default_rng([seed, epoch, index])``.
    - val/test: all ``cpi`` rows, plus ``"references"``: every reference of the image as a
      list of word lists, from ``{SPLIT}_REFERENCES_{name}.json``. Without that file (data
      prepared by the tutorial) the references are the image's ``cpi`` caption rows decoded
      with ``WORDMAP_{name}.json`` (``<start>``, ``<end>``, ``<pad>`` dropped) and the image
      id is the image's row index in the HDF5 file.

    Args:
        data_folder: folder holding the prepared files.
        data_name: ``f"{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq"``.
        split: ``train``, ``val`` or ``test``.
        captions_per_sample: caption rows per training item, ``1..cpi``; None means all.
            Ignored for val/test, which always return all rows.
        seed: seed of the per-(epoch, index) row choice.
        with_references: items carry ``"references"``; None = val/test only.
    """

    def __init__(self, data_folder: str | os.PathLike, data_name: str, split: str,
                 captions_per_sample: int | None = None, seed: int = 0,
                 with_references: bool | None = None):
        self.data_folder = Path(data_folder)
        self.data_name = data_name
        self.split = split
        self.seed = int(seed)
        self.paths = split_files(data_folder, data_name, split)
        missing = [str(p) for p in (self.paths.images, self.paths.captions, self.paths.caplens)
                   if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{split} split of {data_name!r}: missing prepared file(s) {missing}. Prepare them "
                f"with CaptionDataModule.prepare_data() or `python -m captioner.data.preprocess`. "
                + QUICKSTART_HINT)

        images_path = self.paths.images
        try:
            with h5py.File(images_path, "r") as h5:  # metadata only; closed before any fork
                if "images" not in h5:
                    raise ValueError(f"{images_path} has no dataset 'images'; expected uint8 "
                                     f"(N, 3, S, S) as written by the preprocessing")
                shape, dtype = h5["images"].shape, h5["images"].dtype
                attrs = dict(h5.attrs)
        except OSError as e:
            raise ValueError(f"{images_path} is not a readable HDF5 file ({e}); delete it and "
                             f"prepare the data again") from None
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or dtype != np.uint8:
            raise ValueError(f"{images_path}: 'images' is {dtype} {shape}; expected uint8 "
                             f"(N, 3, S, S)")
        if "complete" in attrs and not bool(attrs["complete"]):
            raise ValueError(f"{images_path} is marked incomplete (preprocessing was interrupted); "
                             f"prepare the data again with overwrite=True")
        if "captions_per_image" not in attrs:
            raise ValueError(f"{images_path} lacks the attribute 'captions_per_image'")
        self.num_images = int(shape[0])
        self.image_size = int(shape[2])
        self.captions_per_image = int(attrs["captions_per_image"])
        self.fingerprint = _attr_str(attrs.get("fingerprint"))
        cpi = self.captions_per_image

        captions = _load_json(self.paths.captions)
        caplens = _load_json(self.paths.caplens)
        expected_rows = self.num_images * cpi
        if not isinstance(captions, list) or len(captions) != expected_rows:
            raise ValueError(f"{self.paths.captions} has {len(captions)} rows; expected "
                             f"{self.num_images} images x {cpi} captions = {expected_rows}")
        if not isinstance(caplens, list) or len(caplens) != expected_rows:
            raise ValueError(f"{self.paths.caplens} has {len(caplens)} entries; expected "
                             f"{expected_rows}")
        row_lens = {len(row) for row in captions}
        if len(row_lens) > 1:
            raise ValueError(f"{self.paths.captions}: rows have different lengths "
                             f"{sorted(row_lens)}; every row must have max_len + 2 ids")
        caption_array = np.asarray(captions, dtype=np.int64)
        # Kept compact (shared copy-on-write by forked workers, pickled to spawned ones).
        small = caption_array.size == 0 or (caption_array.min() >= 0 and caption_array.max() < 2**16)
        self._captions = caption_array.astype(np.uint16 if small else np.int32)  # (N*cpi, T)
        self._caplens = np.asarray(caplens, dtype=np.int64)  # (N*cpi,)
        self.max_tokens = int(self._captions.shape[1]) if expected_rows else 0
        if expected_rows and (self._caplens.min() < 2 or self._caplens.max() > self.max_tokens):
            raise ValueError(f"{self.paths.caplens}: lengths must lie in 2..{self.max_tokens} "
                             f"(T of {self.paths.captions})")

        if captions_per_sample is not None and not 1 <= int(captions_per_sample) <= cpi:
            raise ValueError(f"captions_per_sample must be in 1..{cpi} (captions per image of "
                             f"{images_path}), got {captions_per_sample}")
        self.captions_per_sample = cpi if captions_per_sample is None else int(captions_per_sample)

        self._word_map_cache: WordMap | None = None
        self.has_reference_file = self.paths.references.is_file()
        self.with_references = split != "train" if with_references is None else bool(with_references)
        self.image_ids, self._references = self._load_references(keep_tokens=self.with_references)
        self.epoch = 0
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None

    # ------------------------------------------------------------------ references
    def _load_references(self, keep_tokens: bool) -> tuple[np.ndarray, list | None]:
        """Image ids (N,) int64 and, if ``keep_tokens``, the token references of every image."""
        if not self.has_reference_file:
            refs = [self._decoded_rows(i) for i in range(self.num_images)] if keep_tokens else None
            return np.arange(self.num_images, dtype=np.int64), refs
        path = self.paths.references
        data = _load_json(path)
        for key in ("image_ids", "tokens"):
            if key not in data or len(data[key]) != self.num_images:
                raise ValueError(f"{path}: field {key!r} must list {self.num_images} entries "
                                 f"(one per image of {self.paths.images})")
        image_ids = np.asarray(data["image_ids"], dtype=np.int64)
        return image_ids, (data["tokens"] if keep_tokens else None)

    @property
    def references(self) -> list[list[list[str]]]:
        """Every image's references as word lists (needs ``with_references``)."""
        if self._references is None:
            raise RuntimeError(f"{self.split} dataset built with with_references=False has no references")
        return self._references

    def _word_map(self) -> WordMap:
        if self._word_map_cache is None:
            path = word_map_file(self.data_folder, self.data_name)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{self.paths.references} is absent, so references are decoded from the "
                    f"caption rows, which needs the word map {path}; it does not exist")
            self._word_map_cache = WordMap.load(path)
        return self._word_map_cache

    def _decoded_rows(self, index: int) -> list[list[str]]:
        cpi = self.captions_per_image
        rows = self._captions[index * cpi:(index + 1) * cpi]
        return [self._word_map().decode(row) for row in rows.tolist()]

    def raw_references(self) -> dict[int, list[str]]:
        """``{image_id: [raw caption strings]}`` for every image of the split.

        From the ``raw`` field of the REFERENCES file; without that file, the decoded caption
        rows joined by spaces, keyed by image row index.
        """
        if not self.has_reference_file:
            return {i: [" ".join(words) for words in self._decoded_rows(i)]
                    for i in range(self.num_images)}
        path = self.paths.references
        data = _load_json(path)
        if "raw" not in data or len(data["raw"]) != self.num_images:
            raise ValueError(f"{path}: field 'raw' must list {self.num_images} entries")
        return {int(i): list(raw) for i, raw in zip(data["image_ids"], data["raw"])}

    # ------------------------------------------------------------------ sampling
    def set_epoch(self, epoch: int) -> None:
        """Epoch used to choose caption rows for plain integer indices."""
        self.epoch = int(epoch)

    def caption_rows(self, index: int, epoch: int | None = None) -> np.ndarray:
        """Caption-row numbers (into the CAPTIONS file) of image ``index`` for ``epoch``.

        Returns:
            (k,) int64, ascending, within ``index*cpi .. index*cpi + cpi - 1``; all ``cpi`` rows
            for val/test or when ``captions_per_sample`` is None or ``cpi``.
        """
        cpi, k = self.captions_per_image, self.captions_per_sample
        if self.split != "train" or k == cpi:
            picks = np.arange(cpi, dtype=np.int64)
        else:
            epoch = self.epoch if epoch is None else int(epoch)
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            picks = np.sort(rng.permutation(cpi)[:k]).astype(np.int64)
        return index * cpi + picks

    @property
    def max_caption_lengths(self) -> np.ndarray:
        """Per image, the longest of its ``cpi`` caption rows: the length-bucketing key.

        Lengths count ``<start>`` and ``<end>``, so a batch of these images runs
        ``max - 1`` decoder steps. With ``captions_per_sample < cpi`` the rows an epoch uses
        may all be shorter, so the value is an upper bound of that epoch's longest row.

        Returns:
            (N,) int64, ``max(lengths of rows i*cpi .. i*cpi + cpi - 1)`` for image ``i``.
        """
        cpi = self.captions_per_image
        return self._caplens.reshape(self.num_images, cpi).max(axis=1)  # (N, cpi) -> (N,)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return self.num_images

    def _images(self) -> h5py.Dataset:
        pid = os.getpid()
        if self._h5 is None or self._h5_pid != pid:
            if self._h5 is not None:
                # Inherited through fork: close this process's copy (the parent's stays open)
                # so that HDF5 opens a file descriptor of our own instead of sharing it.
                self._h5.close()
            self._h5 = h5py.File(self.paths.images, "r")
            self._h5_pid = pid
        return self._h5["images"]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """One image with its caption rows.

        Args:
            index: image index ``0..N-1``, or ``(index, epoch)`` as yielded by
                :class:`EpochAwareSampler`.
        """
        epoch = None
        if isinstance(index, (tuple, list)):
            index, epoch = index
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for {self.num_images} images "
                             f"in {self.paths.images}")
        rows = self.caption_rows(index, epoch)
        item: dict[str, Any] = {
            "images": torch.from_numpy(np.ascontiguousarray(self._images()[index])),
            "captions": torch.from_numpy(self._captions[rows].astype(np.int64)),
            "lengths": torch.from_numpy(self._caplens[rows]),
            "image_ids": int(self.image_ids[index]),
        }
        if self.with_references:
            item["references"] = [list(ref) for ref in self._references[index]]
        return item

    # ------------------------------------------------------------------ handles
    def close(self) -> None:
        """Close this process's HDF5 handle, if any (reopened on next access)."""
        if self._h5 is not None and self._h5_pid == os.getpid():
            self._h5.close()
        self._h5, self._h5_pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return (f"CaptionH5Dataset({self.split}, {self.data_name}, {self.num_images} images, "
                f"cpi={self.captions_per_image}, k={self.captions_per_sample})")


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class EpochAwareSampler(DistributedSampler):
    """A (distributed) sampler that yields ``(index, epoch)`` so items know the epoch.

    It is a :class:`~torch.utils.data.distributed.DistributedSampler`, so Lightning keeps it
    under DDP instead of inserting its own, and calls :meth:`set_epoch` with the fit loop's
    epoch at the start of every epoch (also after resuming from a checkpoint). Each of
    ``num_replicas`` ranks gets a disjoint share of a permutation seeded by ``seed + epoch``;
    with ``drop_last=False`` the last share is padded with repeats to equal length.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: number of ranks (1 without DDP).
        rank: this rank, ``0..num_replicas-1``.
        shuffle: permute the indices each epoch.
        seed: seed of the permutation.
        drop_last: drop the tail instead of padding it.
    """

    def __init__(self, dataset: Sequence, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in super().__iter__():
            yield int(index), epoch


class LengthBucketSampler(EpochAwareSampler):
    """An :class:`EpochAwareSampler` whose batches hold items of similar length.

    The decoder runs ``max(lengths) - 1`` steps per batch and on a GPU each step costs about
    the same (launch-bound) time however many captions are still running, so batches of
    similar caption length need fewer steps. Each epoch:

    1. the global index list of :class:`~torch.utils.data.distributed.DistributedSampler`
       before sharding: a permutation seeded by ``seed + epoch`` (``range`` without
       ``shuffle``), padded by repeating from its start (or truncated with ``drop_last``) to
       ``total_size = num_samples * num_replicas``;
    2. cut into pools of ``pool_batches * batch_size * num_replicas`` consecutive indices,
       each sorted by ``lengths`` (stable: ties keep the permutation's order);
    3. each pool cut into global batches of ``G = batch_size * num_replicas``; with
       ``shuffle`` the full global batches of the epoch are put in an order drawn from the
       same generator, so long batches are not clustered. A last global batch with fewer than
       ``G`` items (a multiple of ``num_replicas``) stays last;
    4. rank ``r`` takes items ``r*batch_size .. (r+1)*batch_size - 1`` of each full global
       batch and the ``r``-th of ``num_replicas`` equal contiguous parts of the last partial one.

    Every rank yields ``num_samples`` pairs ``(index, epoch)`` (the same multiset of indices
    over all ranks as the plain sampler's), and at each step the ranks hold neighbouring
    slices of one sorted global batch, so under DDP they also wait less for each other. The
    order depends only on ``(seed, epoch)``. The DataLoader must use the same ``batch_size``
    and ``drop_last=False``: its consecutive chunks of ``batch_size`` are then exactly the
    bucketed batches.

    Args:
        dataset: the dataset (only its length is used).
        lengths: (N,) numbers, the sort key of each of the ``N = len(dataset)`` items, for
            example :attr:`CaptionH5Dataset.max_caption_lengths`.
        batch_size: items per batch on each rank (the DataLoader's ``batch_size``).
        num_replicas: number of ranks (1 without DDP).
        rank: this rank, ``0..num_replicas-1``.
        shuffle: permute the indices and the batch order each epoch.
        seed: seed of the permutations.
        drop_last: drop the tail instead of padding it (as ``DistributedSampler`` does).
        pool_batches: global batches per sorted pool; larger pools give more uniform batches,
            smaller ones keep more of the permutation's randomness.
    """

    def __init__(self, dataset: Sequence, lengths: Sequence[int] | np.ndarray, batch_size: int,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, pool_batches: int = 50):
        keys = np.asarray(lengths)
        if keys.ndim != 1 or keys.shape[0] != len(dataset) or keys.dtype.kind not in "iuf":
            raise ValueError(f"lengths must hold one number per item of the dataset, shape "
                             f"({len(dataset)},); got {keys.dtype} {keys.shape}")
        for name, value in (("batch_size", batch_size), ("pool_batches", pool_batches),
                            ("num_replicas", num_replicas)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.lengths = keys.copy()
        self.batch_size = int(batch_size)
        self.pool_batches = int(pool_batches)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches, in the order the ranks take them.

        Returns:
            int64 arrays of ``batch_size * num_replicas`` dataset indices, each sorted by
            length, plus possibly a shorter last one; ``total_size`` indices in all.
        """
        n = len(self.dataset)
        generator = None
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        # Cyclic repeat from the start (padding) or truncation (drop_last): DistributedSampler's.
        order = np.resize(order, self.total_size).astype(np.int64)
        size = self.batch_size * self.num_replicas
        pool = self.pool_batches * size
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        # Pools are whole multiples of the global batch: only the very last batch can be short.
        full = [b for b in batches if len(b) == size]
        tail = batches[len(full):]
        if generator is not None and len(full) > 1:
            full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return full + tail

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        size = self.batch_size * self.num_replicas
        for batch in self.global_batches():
            share = self.batch_size if len(batch) == size else len(batch) // self.num_replicas
            for index in batch[self.rank * share:(self.rank + 1) * share]:
                yield int(index), epoch


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of :class:`CaptionH5Dataset` into the batch dict (see the module docstring).

    Args:
        samples: B items, all of the same split (all with or all without ``references``)
            and with the same number of caption rows.

    Returns:
        ``images`` uint8 (B, 3, S, S), ``captions`` int64 (B, k, T), ``lengths`` int64 (B, k),
        ``image_ids`` int64 (B,), and for val/test ``references``: B lists of token lists.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    has_refs = {"references" in s for s in samples}
    if len(has_refs) > 1:
        raise ValueError("collate got a mix of train items (no 'references') and val/test items")
    row_counts = {tuple(s["captions"].shape) for s in samples}
    if len(row_counts) > 1:
        raise ValueError(f"collate got caption blocks of different shapes {sorted(row_counts)}; "
                         f"every item of a batch needs the same (k, T)")
    batch: dict[str, Any] = {
        "images": torch.stack([s["images"] for s in samples]),  # (B, 3, S, S)
        "captions": torch.stack([s["captions"] for s in samples]),  # (B, k, T)
        "lengths": torch.stack([s["lengths"] for s in samples]),  # (B, k)
        "image_ids": torch.tensor([int(s["image_ids"]) for s in samples], dtype=torch.int64),
    }
    if has_refs.pop():
        batch["references"] = [s["references"] for s in samples]
    return batch


__all__ = ["CaptionH5Dataset", "EpochAwareSampler", "LengthBucketSampler", "collate",
           "SPLITS", "QUICKSTART_HINT"]
