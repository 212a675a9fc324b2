"""Karpathy JSON + image folder -> the tutorial's HDF5/JSON files (see docs/architecture.md).

For ``name = f"{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq"`` in the output folder:
``WORDMAP_{name}.json``, and per split ``{SPLIT}_IMAGES_{name}.hdf5`` (dataset ``images`` uint8
(N, 3, S, S)), ``{SPLIT}_CAPTIONS_{name}.json`` (N*cpi padded id rows), ``{SPLIT}_CAPLENS_{name}.json``
and our ``{SPLIT}_REFERENCES_{name}.json`` (all references per image).

Safety: every file is written under a temp name and renamed when complete. All HDF5 files are
staged first (so a bad image fails before any output is touched), then the word map and the
JSONs are renamed into place, then the HDF5 files, which carry ``fingerprint`` and
``complete=True``: an HDF5 under its final name means the whole split is complete. A lock file
serialises concurrent calls (DDP ranks); a call whose outputs exist with the same fingerprint
is a no-op, also in a folder this process cannot write (a shared, read-only dataset folder).

Memory: peak memory does not grow with the captions. The Karpathy JSON is streamed
(:func:`captioner.data.karpathy.iter_karpathy`) from one open handle in one pass, which
validates it, counts train words, counts each split (so every JSON error, and a missing short
caption, comes before any image is decoded) and copies each usable image's id, path and
captions as a JSON line to its split's spool file (temp disk about the JSON's size, never
memory); then one pass per split over its spool samples the captions, appends each image's
JSON text to scratch files and hands the image to the decode workers as it goes; the split's
JSON temp files are then assembled from the scratch lines of the images that were kept. Only
the split being decoded keeps per-image data (its ids and JSON positions, 16 bytes an image).
The outputs are byte for byte what ``json.dumps`` of the whole lists gives.

Run alone with ``python -m captioner.data.preprocess --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import sys
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, TextIO

import h5py

from captioner.data.images import (CHUNKSIZE, DEFAULT_DRAFT_MIN_RATIO, ImageWriter,
                                   check_draft_min_ratio)
from captioner.data.karpathy import SPLITS, KarpathyImage, build_word_map, iter_karpathy
from captioner.files import new_file_mode, replace_durably, write_json_atomic
from captioner.vocab import WordMap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOCK_NAME = ".preprocess.lock"


def data_name(dataset: str, captions_per_image: int, min_word_freq: int) -> str:
    """The tutorial's base file name: ``{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq``."""
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


@dataclass(frozen=True)
class SplitFiles:
    """The four files of one split (``split`` lowercase, file names upper case)."""

    images: Path
    captions: Path
    caplens: Path
    references: Path


def split_files(output_folder: str | os.PathLike, name: str, split: str) -> SplitFiles:
    """Paths of one split's files for data name ``name`` (see :func:`data_name`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (lowercase), got {split!r}")
    folder, upper = Path(output_folder), split.upper()
    return SplitFiles(images=folder / f"{upper}_IMAGES_{name}.hdf5",
                      captions=folder / f"{upper}_CAPTIONS_{name}.json",
                      caplens=folder / f"{upper}_CAPLENS_{name}.json",
                      references=folder / f"{upper}_REFERENCES_{name}.json")


def word_map_file(output_folder: str | os.PathLike, name: str) -> Path:
    return Path(output_folder) / f"WORDMAP_{name}.json"


@dataclass(frozen=True)
class SkippedImage:
    """An image left out by ``skip_bad_images=True`` and why."""

    path: str
    image_id: int
    split: str
    reason: str


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`create_input_files` produced (or found already produced).

    Attributes:
        output_folder: where the files are.
        data_name: the tutorial's base name (see :func:`data_name`).
        word_map_path: ``WORDMAP_{data_name}.json``.
        num_images: images written per split, ``{"train": N, "val": N, "test": N}``.
        skipped: images left out (only with ``skip_bad_images=True``).
        noop: True if the outputs already existed with the same fingerprint.
        fingerprint: hash of the settings, the JSON's sha256 and the image folder; stored
            in every HDF5's ``fingerprint`` attribute.
    """

    output_folder: Path
    data_name: str
    word_map_path: Path
    num_images: dict[str, int]
    skipped: list[SkippedImage] = field(default_factory=list)
    noop: bool = False
    fingerprint: str = ""


def _available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform has one (Linux),
    else ``os.cpu_count()`` (macOS and Windows have no ``os.sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- locking, fingerprints
@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# Errors of opening a lock file for writing that mean "this process may not write here".
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def _output_lock(path: Path) -> Iterator[OSError | None]:
    """:func:`exclusive_lock` on ``path`` in an output folder that may be read-only.

    Yields None while holding the exclusive lock, taken on the lock file opened for appending
    (created if needed) or, when this process may not write it (another user's lock file in a
    shared dataset folder, a read-only mount), opened read-only: ``flock`` needs no write
    access. Yields the error instead, holding no lock, when the lock file does not exist and
    cannot be created, or cannot be locked read-only (NFS): the caller may then only use
    outputs that are already complete.
    """
    file, error = _open_lock_file(path)
    if file is not None:
        with file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            except OSError as e:
                if file.writable():
                    raise
                error = e  # NFS emulates flock with fcntl locks, which need write access
            else:
                try:
                    yield None
                finally:
                    fcntl.flock(file.fileno(), fcntl.LOCK_UN)
                return
    yield error


def _open_lock_file(path: Path) -> tuple[IO | None, OSError | None]:
    """``path`` opened for appending, else read-only; else (None, why it is not writable)."""
    try:
        return open(path, "a"), None
    except OSError as e:
        if e.errno not in _NOT_WRITABLE:
            raise
        error = e
    try:
        return open(path, "rb"), None
    except FileNotFoundError:
        return None, error


def _sha256(file: BinaryIO) -> str:
    """sha256 of an open binary file's whole content (read from the start)."""
    digest = hashlib.sha256()
    file.seek(0)
    for chunk in iter(lambda: file.read(1 << 16), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _existing_state(paths: list[SplitFiles], word_map_path: Path, fingerprint: str) -> tuple[str, str]:
    """``("complete" | "absent" | "partial" | "conflict", detail)`` of the final outputs.

    Only the HDF5 files count as markers: JSONs without their HDF5 are leftovers of an
    interrupted commit and get rewritten.
    """
    found = []
    for files in paths:
        if not files.images.exists():
            continue
        try:
            with h5py.File(files.images, "r") as h:
                found.append((files.images, h.attrs.get("fingerprint"), bool(h.attrs.get("complete", False))))
        except OSError:
            found.append((files.images, None, False))
    for path, stored, complete in found:
        if stored != fingerprint or not complete:
            stored = stored.decode() if isinstance(stored, bytes) else stored
            return "conflict", (f"{path} exists with fingerprint {stored!r} (complete={complete}), "
                                f"but these inputs and settings give {fingerprint!r}")
    jsons = [word_map_path] + [p for f in paths for p in (f.captions, f.caplens, f.references)]
    if len(found) == len(paths) and all(p.exists() for p in jsons):
        return "complete", ""
    return ("partial" if found else "absent"), ""


# --------------------------------------------------------------------------- main entry
def create_input_files(dataset: str,
                       karpathy_json_path: str | os.PathLike,
                       image_folder: str | os.PathLike,
                       captions_per_image: int = 5,
                       min_word_freq: int = 5,
                       output_folder: str | os.PathLike = ".",
                       max_len: int = 50,
                       image_size: int = 256,
                       num_workers: int | None = None,
                       draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO,
                       skip_bad_images: bool = False,
                       overwrite: bool | str = False,
                       seed: int = 123,
                       progress: bool = True) -> PreprocessResult:
    """Write the tutorial's input files (word map, per-split HDF5 + caption JSONs) once.

    Captions longer than ``max_len`` tokens are dropped; of the rest, each image gets
    ``captions_per_image`` rows: all of them plus ``random.choice`` picks when there are
    fewer, else ``random.sample`` (one ``random.Random(seed)`` over train, val, test in file
    order, as the tutorial). The word map comes from all train captions with
    ``count >= min_word_freq`` (note: the tutorial used ``>``).

    Args:
        dataset: name used in file names (``coco``, ``flickr8k``, ``flickr30k``, ``shapes``...).
        karpathy_json_path: Karpathy's ``dataset_*.json``.
        image_folder: folder the JSON's ``filepath``/``filename`` are relative to.
        captions_per_image: caption rows per image (cpi).
        min_word_freq: keep words seen at least this often in train captions.
        output_folder: where the files go (created).
        max_len: longest caption kept, in tokens; rows hold ``max_len + 2`` ids.
        image_size: images are resized to (S, S) = (image_size, image_size).
        num_workers: decoding processes; None = the CPUs this process may use (in-process
            for tiny datasets), 0 = decode in this process.
        draft_min_ratio: JPEGs are decoded at a reduced DCT scale when that keeps at least
            ``draft_min_ratio * S`` pixels per side (see
            :func:`captioner.data.images.load_image`); None decodes every image in full.
        skip_bad_images: drop unreadable images and images without a caption of at most
            ``max_len`` tokens (listed in the result and logged) instead of failing.
        overwrite: True: rebuild even if outputs exist (with these or other settings).
            ``"stale"``: rebuild only outputs made from other inputs or settings; use
            matching ones (what the other DDP ranks of a ``data.overwrite=true`` run do).
        seed: caption sampling seed (the tutorial's 123).
        progress: show a tqdm bar (images/s) per split.

    Returns:
        A :class:`PreprocessResult`.

    Raises:
        ValueError: bad arguments, a malformed Karpathy JSON, existing outputs made with
            other settings (without ``overwrite``), or an image without usable captions.
        OSError: an unreadable image (without ``skip_bad_images``), naming the file and
            its Karpathy entry; no output is left behind.
        PermissionError: ``output_folder`` is not writable (no lock file can be made there)
            and its outputs are not complete, or ``overwrite`` asks for a rebuild. Complete
            outputs in a read-only folder are used as they are.
    """
    if overwrite not in (True, False, "stale"):
        raise ValueError(f"overwrite must be true, false or 'stale', got {overwrite!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(dataset)):
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, '_', '-' or '.'")
    for arg, value in (("captions_per_image", captions_per_image), ("min_word_freq", min_word_freq),
                       ("max_len", max_len), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 or None, got {num_workers}")
    check_draft_min_ratio(draft_min_ratio)
    karpathy_json_path, image_folder = Path(karpathy_json_path), Path(image_folder)
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    name = data_name(dataset, captions_per_image, min_word_freq)
    paths = [split_files(output_folder, name, split) for split in SPLITS]
    word_map_path = word_map_file(output_folder, name)

    with _output_lock(output_folder / LOCK_NAME) as lock_error, contextlib.ExitStack() as stack:
        if not karpathy_json_path.is_file():
            raise FileNotFoundError(f"Karpathy JSON {karpathy_json_path} does not exist")
        # One handle for the hash and every pass: a JSON replaced meanwhile cannot mix in.
        json_file = stack.enter_context(open(karpathy_json_path, "rb"))
        fingerprint = _fingerprint({
            "format_version": FORMAT_VERSION, "dataset": dataset,
            "captions_per_image": captions_per_image, "min_word_freq": min_word_freq,
            "max_len": max_len, "image_size": image_size, "seed": seed,
            "skip_bad_images": skip_bad_images, "draft_min_ratio": draft_min_ratio,
            "image_folder": str(image_folder.resolve()),
            "karpathy_json_sha256": _sha256(json_file)})
        state, detail = _existing_state(paths, word_map_path, fingerprint)
        if state == "complete" and overwrite is not True:
            return _read_result(output_folder, name, paths, word_map_path, fingerprint)
        if lock_error is not None:  # unlocked: reading complete files is all we may do
            files = {"complete": "complete, but overwrite=True asks for a rebuild",
                     "absent": "missing", "partial": "incomplete",
                     "conflict": f"from other inputs or settings ({detail})"}[state]
            raise PermissionError(
                f"output folder {output_folder} is not writable by this process (cannot create "
                f"or lock {LOCK_NAME} there: {lock_error.strerror}), and its files for {name} "
                f"are {files}. Make the folder writable, or prepare the files in a writable "
                f"output_folder (data.data_folder).")
        if state == "conflict" and not overwrite:
            raise ValueError(f"{detail}. Pass overwrite=True (--overwrite) to rebuild, or choose "
                             f"another output_folder.")
        for stale in output_folder.glob(f".*{name}*.tmp"):  # only we write these; we hold the lock
            stale.unlink(missing_ok=True)
        source = _Source(karpathy_json_path, image_folder, json_file)
        return _build(source, captions_per_image, min_word_freq, name, paths, word_map_path,
                      max_len, image_size, num_workers, draft_min_ratio, skip_bad_images, seed,
                      progress, fingerprint, output_folder)


def _read_result(output_folder: Path, name: str, paths: list[SplitFiles], word_map_path: Path,
                 fingerprint: str) -> PreprocessResult:
    num_images, skipped = {}, []
    for split, files in zip(SPLITS, paths):
        with h5py.File(files.images, "r") as h:
            num_images[split] = int(h["images"].shape[0])
            skipped += [SkippedImage(**s) for s in json.loads(h.attrs.get("skipped", "[]"))]
    return PreprocessResult(output_folder, name, word_map_path, num_images, skipped,
                            noop=True, fingerprint=fingerprint)


@dataclass(frozen=True)
class _Source:
    """The Karpathy JSON, read in passes from one open handle (see :func:`iter_karpathy`)."""

    json_path: Path
    image_folder: Path
    file: BinaryIO

    def images(self) -> Iterator[KarpathyImage]:
        return iter_karpathy(self.json_path, self.image_folder, self.file)

    def describe(self, index: int) -> str:
        """How errors name entry ``index`` (re-reads the JSON: for error messages only)."""
        return next(image for i, image in enumerate(self.images()) if i == index).describe()


@dataclass
class _Survey:
    """What the validating pass learns: per-split counts (the captions go to the spools).

    Attributes:
        num_planned: per split, images with a caption of at most ``max_len`` tokens.
        unusable: per split, the images without one, kept only with ``skip_bad_images``.
        first_unusable: per split, how the error names the first of them.
    """

    max_len: int
    keep_all_unusable: bool
    num_planned: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    unusable: dict[str, list[SkippedImage]] = field(
        default_factory=lambda: {split: [] for split in SPLITS})
    first_unusable: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return f"no caption with at most max_len={self.max_len} tokens"

    def observe(self, images: Iterable[KarpathyImage],
                spools: dict[str, TextIO]) -> Iterator[KarpathyImage]:
        """Pass ``images`` through, counting them; each image with a short enough caption is
        also written to its split's spool (see :func:`_spool_line`)."""
        for image in images:
            if any(len(tokens) <= self.max_len for tokens in image.tokens):
                self.num_planned[image.split] += 1
                spools[image.split].write(_spool_line(image))
            else:
                self.first_unusable.setdefault(image.split, image.describe())
                if self.keep_all_unusable:
                    self.unusable[image.split].append(
                        SkippedImage(str(image.path), image.image_id, image.split, self.reason))
            yield image

    def check(self) -> None:
        """Raise for the first unusable image, in split order (train, val, test)."""
        for split in SPLITS:
            if split in self.first_unusable:
                raise ValueError(f"{self.first_unusable[split]}: {self.reason}; raise max_len or "
                                 f"pass skip_bad_images=True")


def _spool_line(image: KarpathyImage) -> str:
    """One spool line: ``[index, image_id, path, tokens, raw]`` as JSON, newline-terminated.

    The split passes read their images back from these lines instead of parsing (and
    validating) the whole Karpathy JSON again, once per split.
    """
    return json.dumps([image.index, image.image_id, str(image.path), image.tokens,
                       image.raw]) + "\n"


def _sample_captions(captions: list[list[str]], cpi: int, max_len: int,
                     rng: random.Random) -> list[list[str]]:
    """``cpi`` of an image's ``captions`` (token lists) of at most ``max_len`` tokens, of
    which it has at least one (the spools hold only such images).

    All of them plus ``rng.choice`` picks when there are fewer than ``cpi``, else
    ``rng.sample`` (the tutorial's rule and random stream).
    """
    usable = [tokens for tokens in captions if len(tokens) <= max_len]
    if len(usable) < cpi:
        return usable + [rng.choice(usable) for _ in range(cpi - len(usable))]
    return rng.sample(usable, k=cpi)


@dataclass
class _Staged:
    """One split's complete temp files, renamed into place by the commit."""

    images: Path
    captions: Path
    caplens: Path
    references: Path
    num_images: int


def _build(source: _Source, cpi: int, min_word_freq: int, name: str, paths: list[SplitFiles],
           word_map_path: Path, max_len: int, image_size: int, num_workers: int | None,
           draft_min_ratio: float | None, skip_bad_images: bool, seed: int, progress: bool,
           fingerprint: str, output_folder: Path) -> PreprocessResult:
    """Validate, stage every split's files under temp names, then commit them.

    Memory stays flat in the number of captions: the JSON is streamed once to validate it,
    count train words and count each split, and copy each usable image to its split's spool
    file; then each split's spool is read once (train, val, test: the order the random
    stream is consumed) to sample captions and write them out. Across the dataset only the
    split being decoded has per-image data in memory (its ids and JSON positions, for the
    skipped-image records and error messages).
    """
    temps: list[Path] = []  # every temp file we made, removed on the way out
    try:
        survey = _Survey(max_len, keep_all_unusable=skip_bad_images)
        spools = {split: _temp_beside(files.captions, temps, "spool.")
                  for split, files in zip(SPLITS, paths)}
        with contextlib.ExitStack() as stack:
            spool_files = {split: stack.enter_context(open(path, "w", encoding="utf-8"))
                           for split, path in spools.items()}
            word_map = build_word_map(survey.observe(source.images(), spool_files), min_word_freq)
        if not skip_bad_images:
            survey.check()  # before any image is decoded
        skipped = [item for split in SPLITS for item in survey.unusable[split]]

        total = sum(survey.num_planned.values())
        if num_workers is None:
            num_workers = _available_cpus() if total >= 4 * CHUNKSIZE else 0
        rng = random.Random(seed)
        staged: dict[str, _Staged] = {}
        with ImageWriter(image_size, num_workers, draft_min_ratio) as writer:
            for split, files in zip(SPLITS, paths):
                staged[split] = _stage_split(source, spools[split], writer, word_map, rng,
                                             split, files, survey.num_planned[split], cpi,
                                             max_len, fingerprint, skip_bad_images, skipped,
                                             progress, temps)

        # Commit: old HDF5 markers out, word map and JSONs in, HDF5 files last.
        for files in paths:
            files.images.unlink(missing_ok=True)
        write_json_atomic(word_map_path, word_map.to_dict())  # what WordMap.save writes
        for split, files in zip(SPLITS, paths):
            for tmp, final in ((staged[split].captions, files.captions),
                               (staged[split].caplens, files.caplens),
                               (staged[split].references, files.references)):
                replace_durably(tmp, final)
        for split, files in zip(SPLITS, paths):
            replace_durably(staged[split].images, files.images)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)

    if skipped:
        log.warning("skipped %d bad image(s): %s", len(skipped),
                    "; ".join(f"{s.path} ({s.reason})" for s in skipped[:10])
                    + (" ..." if len(skipped) > 10 else ""))
    return PreprocessResult(output_folder, name, word_map_path,
                            {split: staged[split].num_images for split in SPLITS}, skipped,
                            noop=False, fingerprint=fingerprint)


# One scratch file per section of a split's JSON outputs; line i is image i's JSON text.
_SECTIONS = ("captions", "caplens", "image_ids", "paths", "tokens", "raw")
_REFERENCE_KEYS = ("image_ids", "paths", "tokens", "raw")  # REFERENCES_*.json, in this order


def _stage_split(source: _Source, spool: Path, writer: ImageWriter, word_map: WordMap,
                 rng: random.Random, split: str, files: SplitFiles, num_planned: int, cpi: int,
                 max_len: int, fingerprint: str, skip: bool, skipped: list[SkippedImage],
                 progress: bool, temps: list[Path]) -> _Staged:
    """One pass over ``split``'s spool feeding its decode, then its three JSON temp files.

    The pass samples each image's captions, appends its JSON texts to scratch files and hands
    the image to the decoder as it goes, so reading overlaps decoding; once the decoder has
    said which images it could read, the outputs are assembled from the scratch lines of
    those images (``json.dumps`` formatting, byte for byte).
    """
    scratch = {section: _temp_beside(files.captions, temps, f"{section}.") for section in _SECTIONS}
    image_ids = array("q")  # for SkippedImage
    indices = array("q")  # position in the JSON, for error messages
    with contextlib.ExitStack() as stack:
        out = {section: stack.enter_context(open(path, "w", encoding="utf-8"))
               for section, path in scratch.items()}

        def planned() -> Iterator[str]:
            with open(spool, encoding="utf-8") as lines:
                for line in lines:
                    index, image_id, path, tokens, raw = json.loads(line)
                    chosen = _sample_captions(tokens, cpi, max_len, rng)
                    # json.dumps of a list is "[" + ", ".join(items) + "]": keep the items' text
                    out["captions"].write(
                        json.dumps([word_map.encode(t, max_len) for t in chosen])[1:-1])
                    out["caplens"].write(json.dumps([len(t) + 2 for t in chosen])[1:-1])
                    out["image_ids"].write(json.dumps(image_id))
                    out["paths"].write(json.dumps(path))
                    out["tokens"].write(json.dumps(tokens))
                    out["raw"].write(json.dumps(raw))
                    for f in out.values():
                        f.write("\n")  # json.dumps never writes a raw newline
                    image_ids.append(image_id)
                    indices.append(index)
                    yield path
            spool.unlink()

        def describe(i: int) -> str:
            return source.describe(indices[i])

        tmp_h5, failed = _stage_images(writer, planned(), num_planned, image_ids, describe,
                                       split, files.images, cpi, max_len, fingerprint, skip,
                                       skipped, progress, temps)
    num_images = num_planned - len(failed)

    captions = _temp_beside(files.captions, temps)
    with open(captions, "w", encoding="utf-8") as f:
        _copy_list(scratch["captions"], failed, f)
    caplens = _temp_beside(files.caplens, temps)
    with open(caplens, "w", encoding="utf-8") as f:
        _copy_list(scratch["caplens"], failed, f)
    references = _temp_beside(files.references, temps)
    with open(references, "w", encoding="utf-8") as f:
        f.write("{")
        for k, key in enumerate(_REFERENCE_KEYS):
            f.write(f"{', ' if k else ''}{json.dumps(key)}: ")
            _copy_list(scratch[key], failed, f)
        f.write("}")
    mode = new_file_mode()  # what write_json_atomic gives
    for path in (captions, caplens, references):
        os.chmod(path, mode)
    for path in scratch.values():
        path.unlink()
    return _Staged(tmp_h5, captions, caplens, references, num_images)


def _copy_list(scratch: Path, failed: set[int], out: TextIO) -> None:
    """Write ``[line0, line1, ...]`` from a scratch file, leaving out lines in ``failed``."""
    out.write("[")
    separator = ""
    with open(scratch, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i not in failed:
                out.write(separator)
                out.write(line[:-1])
                separator = ", "
    out.write("]")


def _temp_beside(final: Path, temps: list[Path], tag: str = "") -> Path:
    """A new empty temp file ``.{final.name}.{tag}XXXX.tmp`` beside ``final``, registered in
    ``temps``; the name matches the stale-file sweep of :func:`create_input_files`."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{tag}", suffix=".tmp", dir=final.parent)
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]


def _stage_images(writer: ImageWriter, planned: Iterator[str], num_planned: int,
                  image_ids: Sequence[int],
                  describe: Callable[[int], str], split: str, final: Path, cpi: int,
                  max_len: int, fingerprint: str, skip: bool, skipped: list[SkippedImage],
                  progress: bool, temps: list[Path]) -> tuple[Path, set[int]]:
    """Decode one split's images into a temp HDF5; return (temp path, indices left out).

    ``planned`` yields the ``num_planned`` image files as the spool pass reaches them;
    ``image_ids`` is filled by that pass (for the skipped-image records).
    """
    tmp = _temp_beside(final, temps)
    split_skipped: list[SkippedImage] = []
    failed: set[int] = set()

    def on_error(i: int, path: str, error: str) -> None:
        if not skip:
            raise OSError(f"cannot read image {path} ({describe(i)} in the Karpathy "
                          f"JSON): {error}. Fix or remove the file, or pass skip_bad_images=True")
        split_skipped.append(SkippedImage(path, image_ids[i], split, error))
        failed.add(i)

    writer.write(tmp, planned, num_images=num_planned,
                 attrs={"captions_per_image": cpi, "image_size": writer.image_size,
                        "max_len": max_len, "fingerprint": fingerprint, "complete": False},
                 on_error=on_error, desc=f"{split} images", progress=progress)
    skipped += split_skipped
    with h5py.File(tmp, "r+") as h:
        h.attrs["skipped"] = json.dumps([dataclasses.asdict(item) for item in skipped
                                         if item.split == split])
        h.attrs["complete"] = True
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is meant to be shared
    return tmp, failed


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioner.data.preprocess",
        description="Karpathy JSON + images -> the tutorial's HDF5/JSON input files.")
    parser.add_argument("--dataset", required=True, help="name used in file names (coco, flickr8k, ...)")
    parser.add_argument("--karpathy_json_path", required=True)
    parser.add_argument("--image_folder", required=True)
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--min_word_freq", type=int, default=5)
    parser.add_argument("--max_len", type=int, default=50)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--draft_min_ratio", type=float, default=DEFAULT_DRAFT_MIN_RATIO,
                        help="decode JPEGs at 1/2..1/8 scale while keeping this fraction of "
                             "image_size per side (default %(default)s)")
    parser.add_argument("--full_decode", dest="draft_min_ratio", action="store_const",
                        const=None, help="decode every image in full (no draft mode)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--skip_bad_images", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no_progress", dest="progress", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> PreprocessResult:
    """``python -m captioner.data.preprocess --dataset ... --output_folder ...`` (argparse)."""
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = create_input_files(**args)
    log.info("%s %s in %s: %s images, %d skipped", "found" if result.noop else "wrote",
             result.data_name, result.output_folder, result.num_images, len(result.skipped))
    return result


def hydra_main() -> None:
    """``python -m captioner.data.preprocess data=coco``: the training data config, prepared alone."""
    import hydra

    from captioner import run

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="preprocess")
    def _prepare(cfg) -> None:
        run.prepare(cfg)

    _prepare()


def uses_hydra(argv: Sequence[str]) -> bool:
    """Whether ``python -m captioner.data.preprocess ARGV`` goes to Hydra (else argparse).

    Hydra takes the training configs' overrides (``data=coco data.overwrite=true``, ``+key=...``,
    ``~key``), with Hydra's own flags (``--cfg job``, ``-m``) anywhere among them. argparse
    takes this module's ``--flags``, whose values may hold ``=`` (``--output_folder
    out/lr=0.1``): any of them (as ``--flag value``, ``--flag=value`` or a prefix argparse
    accepts) means argparse, and so does a command line without overrides (``--help``).
    """
    own = {option for action in _parser()._actions for option in action.option_strings
           if option.startswith("--") and option != "--help"}  # `data=coco --help`: Hydra's help

    def is_own_flag(arg: str) -> bool:
        flag = arg.split("=", 1)[0]
        return flag.startswith("--") and len(flag) > 2 and any(o.startswith(flag) for o in own)

    if any(is_own_flag(arg) for arg in argv):
        return False
    return any(not arg.startswith("-") and ("=" in arg or arg.startswith("~")) for arg in argv)


if __name__ == "__main__":
    if uses_hydra(sys.argv[1:]):
        hydra_main()
    else:
        main()
