"""Synthetic inputs: COCO-like caption lengths and batches, and a COCO-like JPEG + Karpathy JSON
generator for the preprocessing and loader rows. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.sizes import Sizes
from captioner.files import write_json_atomic


def sample_lengths(rng: np.random.Generator, n: int, sizes: Sizes) -> np.ndarray:
    """Caption lengths incl. <start>/<end>: words ~ N(mean, std) rounded, clipped to 1..max_len."""
    words = np.rint(rng.normal(sizes.mean_words, sizes.std_words, n)).clip(1, sizes.max_len)
    return words.astype(np.int64) + 2


def synthetic_captions(rng: np.random.Generator, n: int, sizes: Sizes, pad_id: int,
                       start_id: int, end_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, max_len + 2) rows ``<start> w.. <end> <pad>..`` with word ids outside the specials."""
    lengths = sample_lengths(rng, n, sizes)
    rows = np.full((n, sizes.max_len + 2), pad_id, dtype=np.int64)
    specials = {pad_id, start_id, end_id}
    words = np.array([i for i in range(sizes.vocab_size) if i not in specials][:sizes.vocab_size])
    for i, length in enumerate(lengths):
        rows[i, 0] = start_id
        rows[i, 1:length - 1] = rng.choice(words, length - 2)
        rows[i, length - 1] = end_id
    return rows, lengths


def synthetic_batch(rng: np.random.Generator, sizes: Sizes, ids: dict[str, int],
                    pool: int = 1) -> dict[str, torch.Tensor]:
    """B images x k captions as the loader delivers them (uint8 images, ``(B, k, T)`` captions,
    ``(B, k)`` lengths). ``pool`` > 1: the B images of most alike longest caption out of
    ``pool`` batches' worth, as length-bucketed batches have them."""
    b, k, s = sizes.batch_images, sizes.captions_per_image, sizes.image_size
    captions, lengths = synthetic_captions(rng, b * k * pool, sizes, ids["pad_id"],
                                           ids["start_id"], ids["end_id"])
    if pool > 1:
        longest = lengths.reshape(-1, k).max(axis=1)
        start = rng.integers(0, len(longest) - b + 1)
        keep = np.argsort(longest, kind="stable")[start:start + b]
        captions = captions.reshape(-1, k, captions.shape[1])[keep].reshape(b * k, -1)
        lengths = lengths.reshape(-1, k)[keep].reshape(-1)
    return {"images": torch.from_numpy(rng.integers(0, 256, (b, 3, s, s), dtype=np.uint8)),
            "captions": torch.from_numpy(captions).view(b, k, -1),
            "lengths": torch.from_numpy(lengths).view(b, k)}


def special_ids(sizes: Sizes) -> dict[str, int]:
    """The tutorial's word-map layout: words 1..V-4, then <unk>, <start>, <end>; <pad> = 0."""
    v = sizes.vocab_size
    return {"pad_id": 0, "unk_id": v - 3, "start_id": v - 2, "end_id": v - 1}


CAPTION_VOCAB = [f"w{i}" for i in range(2000)]


def draw_jpeg(rng: np.random.Generator, width: int, height: int, path: Path) -> np.ndarray:
    """Write a COCO-like JPEG (smooth noise + grain, quality 90); returns its pre-JPEG pixels.

    Returns:
        (height, width, 3) uint8, the pixels before JPEG compression.
    """
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 13, (height, width, 3))
    pixels = (np.asarray(img, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return pixels


def karpathy_entry(rng: np.random.Generator, sizes: Sizes, index: int, filename: str) -> dict:
    """One Karpathy image entry: 5 Zipf-distributed captions, split 80/10/10 by ``index``."""
    zipf = 1.0 / np.arange(1, len(CAPTION_VOCAB) + 1)
    zipf /= zipf.sum()
    sentences = []
    for length in sample_lengths(rng, 5, sizes) - 2:
        tokens = [CAPTION_VOCAB[j] for j in rng.choice(len(CAPTION_VOCAB), length, p=zipf)]
        sentences.append({"tokens": tokens, "raw": " ".join(tokens)})
    split = "val" if index % 10 == 8 else "test" if index % 10 == 9 else "train"
    return {"filepath": "images", "filename": filename, "split": split, "sentences": sentences,
            "imgid": index, "cocoid": index}


def write_raw_dataset(folder: Path, num_images: int, sizes: Sizes, seed: int = 0) -> dict:
    """COCO-like JPEGs (smooth noise, ~640x480, both orientations) and a Karpathy JSON.

    Returns:
        ``{"json": path, "images": folder, "mean_jpeg_kib": float, "originals": {filename:
        (H, W, 3) uint8}}``, the pre-JPEG pixels of the first ``sizes.fidelity_images`` files.
    """
    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries, total_bytes, originals = [], 0, {}
    for i in range(num_images):
        w, h = (sizes.raw_width, sizes.raw_height) if i % 4 else (sizes.raw_height, sizes.raw_width)
        path = image_dir / f"img_{i:06d}.jpg"
        pixels = draw_jpeg(rng, w, h, path)
        if i < sizes.fidelity_images:
            originals[path.name] = pixels
        total_bytes += path.stat().st_size
        entries.append(karpathy_entry(rng, sizes, i, path.name))
    json_path = folder / "dataset_bench.json"
    write_json_atomic(json_path, {"dataset": "bench", "images": entries})
    return {"json": str(json_path), "images": str(folder),
            "mean_jpeg_kib": total_bytes / num_images / 1024, "originals": originals}


def write_memory_dataset(folder: Path, counts: Sequence[int], sizes: Sizes,
                         seed: int = 1) -> dict[int, str]:
    """Karpathy JSONs of ``counts`` entries over ``sizes.memory_jpegs`` small JPEG files.

    Every entry has its own ``cocoid``/``imgid`` and captions but reuses one of a few small
    (S x 3S/4) files, so the metadata grows with the count while decoding stays cheap.

    Returns:
        ``{count: Karpathy JSON path}``; the image folder is ``folder``.
    """
    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(sizes.memory_jpegs):
        path = image_dir / f"small_{i:03d}.jpg"
        draw_jpeg(rng, sizes.image_size, max(2, sizes.image_size * 3 // 4), path)
        names.append(path.name)
    entries = [karpathy_entry(rng, sizes, i, names[i % len(names)]) for i in range(max(counts))]
    paths = {}
    for count in counts:
        paths[count] = str(folder / f"dataset_memory_{count}.json")
        write_json_atomic(paths[count], {"dataset": "memory", "images": entries[:count]})
    return paths
