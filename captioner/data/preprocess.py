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
is a no-op.

Run alone with ``python -m captioner.data.preprocess --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from captioner.data.images import CHUNKSIZE, DEFAULT_DRAFT_MIN_RATIO, ImageWriter
from captioner.data.karpathy import SPLITS, KarpathyImage, build_word_map, read_karpathy
from captioner.vocab import write_json_atomic

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
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
                       overwrite: bool = False,
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
        num_workers: decoding processes; None = CPU count (in-process for tiny datasets),
            0 = decode in this process.
        draft_min_ratio: JPEGs are decoded at a reduced DCT scale when that keeps at least
            ``draft_min_ratio * S`` pixels per side (see
            :func:`captioner.data.images.load_image`); None decodes every image in full.
        skip_bad_images: drop unreadable images and images without a caption of at most
            ``max_len`` tokens (listed in the result and logged) instead of failing.
        overwrite: rebuild even if outputs exist (with these or other settings).
        seed: caption sampling seed (the tutorial's 123).
        progress: show a tqdm bar (images/s) per split.

    Returns:
        A :class:`PreprocessResult`.

    Raises:
        ValueError: bad arguments, a malformed Karpathy JSON, existing outputs made with
            other settings (without ``overwrite``), or an image without usable captions.
        OSError: an unreadable image (without ``skip_bad_images``), naming the file and
            its Karpathy entry; no output is left behind.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(dataset)):
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, '_', '-' or '.'")
    for arg, value in (("captions_per_image", captions_per_image), ("min_word_freq", min_word_freq),
                       ("max_len", max_len), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 or None, got {num_workers}")
    if draft_min_ratio is not None and not 0.0 < draft_min_ratio <= 1.0:
        raise ValueError(f"draft_min_ratio must be in (0, 1] or None (full decode), got "
                         f"{draft_min_ratio!r}")
    karpathy_json_path, image_folder = Path(karpathy_json_path), Path(image_folder)
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    name = data_name(dataset, captions_per_image, min_word_freq)
    paths = [split_files(output_folder, name, split) for split in SPLITS]
    word_map_path = word_map_file(output_folder, name)

    with exclusive_lock(output_folder / LOCK_NAME):
        if not karpathy_json_path.is_file():
            raise FileNotFoundError(f"Karpathy JSON {karpathy_json_path} does not exist")
        fingerprint = _fingerprint({
            "format_version": FORMAT_VERSION, "dataset": dataset,
            "captions_per_image": captions_per_image, "min_word_freq": min_word_freq,
            "max_len": max_len, "image_size": image_size, "seed": seed,
            "skip_bad_images": skip_bad_images, "draft_min_ratio": draft_min_ratio,
            "image_folder": str(image_folder.resolve()),
            "karpathy_json_sha256": _sha256(karpathy_json_path)})
        state, detail = _existing_state(paths, word_map_path, fingerprint)
        if state == "complete" and not overwrite:
            return _read_result(output_folder, name, paths, word_map_path, fingerprint)
        if state == "conflict" and not overwrite:
            raise ValueError(f"{detail}. Pass overwrite=True (--overwrite) to rebuild, or choose "
                             f"another output_folder.")
        for stale in output_folder.glob(f".*{name}*.tmp"):  # only we write these; we hold the lock
            stale.unlink(missing_ok=True)
        return _build(dataset, karpathy_json_path, image_folder, captions_per_image, min_word_freq,
                      output_folder, name, paths, word_map_path, max_len, image_size, num_workers,
                      draft_min_ratio, skip_bad_images, seed, progress, fingerprint)


def _read_result(output_folder: Path, name: str, paths: list[SplitFiles], word_map_path: Path,
                 fingerprint: str) -> PreprocessResult:
    num_images, skipped = {}, []
    for split, files in zip(SPLITS, paths):
        with h5py.File(files.images, "r") as h:
            num_images[split] = int(h["images"].shape[0])
            skipped += [SkippedImage(**s) for s in json.loads(h.attrs.get("skipped", "[]"))]
    return PreprocessResult(output_folder, name, word_map_path, num_images, skipped,
                            noop=True, fingerprint=fingerprint)


@dataclass
class _SplitPlan:
    images: list[KarpathyImage]
    captions: list[list[list[str]]]  # per image: captions_per_image token lists


def _plan_split(images: list[KarpathyImage], cpi: int, max_len: int, rng: random.Random,
                skip: bool, skipped: list[SkippedImage]) -> _SplitPlan:
    plan = _SplitPlan([], [])
    for image in images:
        usable = [tokens for tokens in image.tokens if len(tokens) <= max_len]
        if not usable:
            reason = f"no caption with at most max_len={max_len} tokens"
            if not skip:
                raise ValueError(f"{image.describe()}: {reason}; raise max_len or pass "
                                 f"skip_bad_images=True")
            skipped.append(SkippedImage(str(image.path), image.image_id, image.split, reason))
            continue
        if len(usable) < cpi:
            chosen = usable + [rng.choice(usable) for _ in range(cpi - len(usable))]
        else:
            chosen = rng.sample(usable, k=cpi)
        plan.images.append(image)
        plan.captions.append(chosen)
    return plan


def _build(dataset, karpathy_json_path, image_folder, cpi, min_word_freq, output_folder, name,
           paths, word_map_path, max_len, image_size, num_workers, draft_min_ratio, skip_bad_images, seed,
           progress, fingerprint) -> PreprocessResult:
    images = read_karpathy(karpathy_json_path, image_folder)
    word_map = build_word_map(images, min_word_freq)
    rng = random.Random(seed)
    skipped: list[SkippedImage] = []
    plans = {}
    for split in SPLITS:
        split_images = [image for image in images if image.split == split]
        plans[split] = _plan_split(split_images, cpi, max_len, rng, skip_bad_images, skipped)

    total = sum(len(plan.images) for plan in plans.values())
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if total >= 4 * CHUNKSIZE else 0
    staged: dict[str, tuple[Path, list[int]]] = {}
    try:
        with ImageWriter(image_size, num_workers, draft_min_ratio) as writer:
            for split, files in zip(SPLITS, paths):
                staged[split] = _stage_images(writer, plans[split], split, files.images, cpi,
                                              max_len, fingerprint, skip_bad_images, skipped,
                                              progress)
    except BaseException:
        for tmp, _ in staged.values():
            tmp.unlink(missing_ok=True)
        raise

    # Commit: old HDF5 markers out, JSONs in, HDF5 files last.
    try:
        for files in paths:
            files.images.unlink(missing_ok=True)
        word_map.save(word_map_path)
        for split, files in zip(SPLITS, paths):
            plan, kept = plans[split], staged[split][1]
            rows, lengths = [], []
            for i in kept:
                for tokens in plan.captions[i]:
                    rows.append(word_map.encode(tokens, max_len))
                    lengths.append(len(tokens) + 2)
            write_json_atomic(files.captions, rows)
            write_json_atomic(files.caplens, lengths)
            write_json_atomic(files.references, {
                "image_ids": [plan.images[i].image_id for i in kept],
                "paths": [str(plan.images[i].path) for i in kept],
                "tokens": [plan.images[i].tokens for i in kept],
                "raw": [plan.images[i].raw for i in kept]})
        for split, files in zip(SPLITS, paths):
            os.replace(staged[split][0], files.images)
    finally:
        for tmp, _ in staged.values():
            tmp.unlink(missing_ok=True)

    if skipped:
        log.warning("skipped %d bad image(s): %s", len(skipped),
                    "; ".join(f"{s.path} ({s.reason})" for s in skipped[:10])
                    + (" ..." if len(skipped) > 10 else ""))
    return PreprocessResult(output_folder, name, word_map_path,
                            {split: len(staged[split][1]) for split in SPLITS}, skipped,
                            noop=False, fingerprint=fingerprint)


def _stage_images(writer: ImageWriter, plan: _SplitPlan, split: str, final: Path, cpi: int,
                  max_len: int, fingerprint: str, skip: bool, skipped: list[SkippedImage],
                  progress: bool) -> tuple[Path, list[int]]:
    """Decode one split's images into a temp HDF5; return (temp path, indices kept)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    split_skipped: list[SkippedImage] = []

    def on_error(i: int, error: str) -> None:
        image = plan.images[i]
        if not skip:
            raise OSError(f"cannot read image {image.path} ({image.describe()} in the Karpathy "
                          f"JSON): {error}. Fix or remove the file, or pass skip_bad_images=True")
        split_skipped.append(SkippedImage(str(image.path), image.image_id, split, error))

    try:
        kept = writer.write(tmp, [str(image.path) for image in plan.images],
                            attrs={"captions_per_image": cpi, "image_size": writer.image_size,
                                   "max_len": max_len, "fingerprint": fingerprint,
                                   "complete": False},
                            on_error=on_error, desc=f"{split} images", progress=progress)
        skipped += split_skipped
        with h5py.File(tmp, "r+") as h:
            h.attrs["skipped"] = json.dumps([dataclasses.asdict(item) for item in skipped
                                             if item.split == split])
            h.attrs["complete"] = True
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is meant to be shared
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, kept


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> PreprocessResult:
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
    args = vars(parser.parse_args(argv))
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


if __name__ == "__main__":
    # Hydra overrides (key=value) use the training configs; --flags use the argparse interface.
    if any("=" in arg and not arg.startswith("-") for arg in sys.argv[1:]):
        hydra_main()
    else:
        main()
