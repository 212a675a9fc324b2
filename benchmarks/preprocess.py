"""Preprocessing rows (JPEG -> HDF5 images/s by worker count, draft-mode fidelity, peak RSS) and
the prepared HDF5 dataset the loader and training rows read."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.isolation import run_child
from benchmarks.sizes import Sizes
from benchmarks.synthetic import write_memory_dataset, write_raw_dataset
from benchmarks.timing import rate


@dataclass
class DataSet:
    """A prepared HDF5 dataset (tutorial layout) the loader and training benchmarks read."""

    folder: Path
    name: str
    vocab_size: int
    special_ids: dict[str, int]


# One preprocessing run in a fresh interpreter: its ru_maxrss is then this run's alone, and
# the spawn-started decode workers import nothing heavy from the benchmark's main module.
_PREPROCESS_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
import h5py, numpy as np
from PIL import Image
from captioner.data.preprocess import create_input_files
start = time.perf_counter()
if args["mode"] == "plain":
    entries = json.load(open(args["json"]))["images"][:args["limit"]]
    s = args["image_size"]
    with h5py.File(Path(args["out"]) / "plain.hdf5", "w") as h:
        data = h.create_dataset("images", (len(entries), 3, s, s), dtype="uint8", chunks=(1, 3, s, s))
        for i, e in enumerate(entries):
            with Image.open(Path(args["images"]) / e["filepath"] / e["filename"]) as img:
                rgb = img.convert("RGB").resize((s, s), Image.Resampling.BILINEAR)
            data[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    count = len(entries)
else:
    draft = {"draft_min_ratio": args["draft_min_ratio"]} if "draft_min_ratio" in args else {}
    result = create_input_files("bench", args["json"], args["images"], captions_per_image=5,
                                min_word_freq=1, output_folder=args["out"], max_len=args["max_len"],
                                image_size=args["image_size"], num_workers=args["workers"],
                                overwrite=True, progress=False, **draft)
    count = sum(result.num_images.values())
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork + exec.
try:
    status = Path("/proc/self/status").read_text()
    self_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
except (OSError, StopIteration):
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "images": count, "self_max_rss_kib": self_kib,
                  "largest_child_max_rss_kib": child_kib}))
"""


def preprocess_child(args: dict) -> dict:
    """Run one preprocessing (or plain PIL) pass in a fresh interpreter; returns its report."""
    stdout = run_child(_PREPROCESS_CHILD, args,
                       f"preprocessing {args['mode']}, workers={args.get('workers')}")
    return json.loads(stdout.strip().splitlines()[-1])


PREP = "preprocess create_input_files num_workers="  # + the worker count: row names
BENCH_MIN_WORD_FREQ = 1
BENCH_NAME = f"bench_5_cap_per_img_{BENCH_MIN_WORD_FREQ}_min_word_freq"
PREPROCESS_CONFIGS = [  # (row name, impl, child arguments)
    ("preprocess plain PIL (full decode, resize)", "baseline", {"mode": "plain", "workers": None}),
    ("preprocess create_input_files num_workers=0", "ours", {"mode": "ours", "workers": 0}),
    ("preprocess create_input_files num_workers=1", "ours", {"mode": "ours", "workers": 1}),
    ("preprocess create_input_files num_workers=2", "ours", {"mode": "ours", "workers": 2}),
    ("preprocess create_input_files num_workers=1 draft_min_ratio=None (full decode)", "ours",
     {"mode": "ours", "workers": 1, "draft_min_ratio": None}),
]


def bench_preprocess(sizes: Sizes, repeats: int, workdir: Path) -> tuple[list[dict], DataSet]:
    """Timing rows (each run a fresh interpreter), fidelity rows and peak-RSS rows."""
    n = sizes.preprocess_images
    raw = write_raw_dataset(workdir / "raw", n, sizes)
    base = {"images": raw["images"], "image_size": sizes.image_size, "max_len": sizes.max_len,
            "json": raw["json"], "limit": n}
    rows, outputs = [], {}
    keep = {f"{PREP}1", f"{PREP}2", PREPROCESS_CONFIGS[-1][0]}  # read again below
    for name, impl, config in PREPROCESS_CONFIGS:
        times = []
        for r in range(repeats):
            out = workdir / f"prep_{len(outputs)}_{r}"
            out.mkdir(parents=True, exist_ok=True)
            # Every run starts with no dirty pages of an earlier run being written back: each
            # writes ~0.4 GB, and the kernel's writeback would otherwise compete for the cores
            # with whichever rows come later.
            os.sync()
            times.append(preprocess_child({**base, **config, "out": str(out)})["seconds"])
            if r < repeats - 1 or name not in keep:
                shutil.rmtree(out)  # its dirty pages are dropped, never written
        outputs[name] = out  # the last repeat's files
        rows.append(rate(name, "preprocess", impl, "images/s", n, times,
                         mean_jpeg_kib=raw["mean_jpeg_kib"],
                         raw_size=f"{sizes.raw_width}x{sizes.raw_height}",
                         **({"draft_min_ratio": config["draft_min_ratio"]}
                            if "draft_min_ratio" in config else {})))
    rows += fidelity_rows(outputs["preprocess create_input_files num_workers=1"],
                          outputs[PREPROCESS_CONFIGS[-1][0]], raw["originals"], sizes.image_size)
    rows += memory_rows(sizes, workdir)
    return rows, load_dataset(outputs["preprocess create_input_files num_workers=2"])


def load_dataset(folder: Path) -> DataSet:
    from captioner.vocab import WordMap

    word_map = WordMap.load(folder / f"WORDMAP_{BENCH_NAME}.json")
    return DataSet(folder, BENCH_NAME, len(word_map), word_map.special_ids)


def images_by_filename(folder: Path, filenames: Sequence[str]) -> dict[str, np.ndarray]:
    """The preprocessed (3, S, S) pixels of ``filenames`` from every split of ``folder``."""
    import h5py

    from captioner.data.preprocess import split_files

    wanted, found = set(filenames), {}
    for split in ("train", "val", "test"):
        files = split_files(folder, BENCH_NAME, split)
        with open(files.references) as f:
            paths = json.load(f)["paths"]
        with h5py.File(files.images, "r") as h:
            for row, path in enumerate(paths):
                if Path(path).name in wanted:
                    found[Path(path).name] = h["images"][row]
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"{folder}: no preprocessed image for {sorted(missing)[:5]}")
    return found


def psnr_mad(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> tuple[float, float, int]:
    """PSNR (dB, peak 255, over all pixels), mean and max absolute difference of two image lists."""
    diff = np.concatenate([(x.astype(np.float64) - y.astype(np.float64)).ravel()
                           for x, y in zip(a, b)])
    mse = float(np.mean(diff ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
    return psnr, float(np.mean(np.abs(diff))), int(np.max(np.abs(diff)))


def fidelity_rows(draft_out: Path, full_out: Path, originals: dict[str, np.ndarray],
                  image_size: int) -> list[dict]:
    """Draft-mode error next to the error JPEG quality 90 already adds, in dB (higher = closer).

    ``draft`` and ``full`` are what ``create_input_files`` wrote with the default
    ``draft_min_ratio`` and with ``None``; ``pre-JPEG`` is the same resize
    (:func:`captioner.data.images.resize`) applied to the pixels before JPEG compression.
    """
    from captioner.data.images import resize

    names = sorted(originals)
    draft = images_by_filename(draft_out, names)
    full = images_by_filename(full_out, names)
    reference = {name: resize(originals[name], image_size) for name in names}
    rows = []
    for label, a, b in (("draft (default) vs full decode", draft, full),
                        ("full decode vs resized pre-JPEG pixels (JPEG q90 error)", full, reference),
                        ("draft (default) vs resized pre-JPEG pixels", draft, reference)):
        psnr, mad, max_abs = psnr_mad([a[k] for k in names], [b[k] for k in names])
        rows.append({"name": f"fidelity {label}", "group": "preprocess", "impl": "ours",
                     "unit": "dB PSNR", "value": psnr, "mean_abs_diff": mad, "max_abs_diff": max_abs,
                     "images": len(names)})
    return rows


def memory_rows(sizes: Sizes, workdir: Path) -> list[dict]:
    """Peak RSS of ``create_input_files`` (2 workers) for a small and a large Karpathy JSON."""
    folder = workdir / "raw_memory"
    jsons = write_memory_dataset(folder, sizes.memory_images, sizes)
    rows = []
    for count, json_path in jsons.items():
        out = workdir / f"prep_memory_{count}"
        out.mkdir(parents=True, exist_ok=True)
        report = preprocess_child({"mode": "ours", "workers": 2, "json": json_path,
                                   "images": str(folder), "image_size": sizes.image_size,
                                   "max_len": sizes.max_len, "out": str(out), "limit": count})
        shutil.rmtree(out)  # 20,000 images at S = 256 are 3.7 GiB
        rows.append({"name": f"preprocess peak RSS, {count} images (num_workers=2)",
                     "group": "preprocess", "impl": "ours", "unit": "MiB",
                     "value": report["self_max_rss_kib"] / 1024,
                     "largest_worker_mib": report["largest_child_max_rss_kib"] / 1024,
                     "images": count, "distinct_jpegs": sizes.memory_jpegs,
                     "seconds": report["seconds"]})
    small, large = rows
    per_1000 = 1000.0 / (large["images"] - small["images"])
    large["main_growth_mib_per_1000_images"] = (large["value"] - small["value"]) * per_1000
    large["worker_growth_mib_per_1000_images"] = (
        large["largest_worker_mib"] - small["largest_worker_mib"]) * per_1000
    return rows


def prepare_only(sizes: Sizes, workdir: Path) -> DataSet:
    """The benchmark HDF5 dataset without timing (for --only loader/train)."""
    n = sizes.preprocess_images
    raw = write_raw_dataset(workdir / "raw", n, sizes)
    out = workdir / "prep_data"
    preprocess_child({"images": raw["images"], "image_size": sizes.image_size,
                      "max_len": sizes.max_len, "mode": "ours", "workers": 2, "json": raw["json"],
                      "out": str(out), "limit": n})
    return load_dataset(out)
