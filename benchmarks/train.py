"""Training rows: a full optimisation step of ours and of the tutorial reference on a synthetic
batch (frozen and fine-tuned encoder), and ours fed by the real HDF5 loader. Each row runs in a
fresh interpreter (:mod:`benchmarks.isolation`); the Lightning-loop row is
:mod:`benchmarks.lightning_loop`."""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import tutorial_reference as tut
from benchmarks.isolation import isolated_rows, keep_applies
from benchmarks.lightning_loop import bench_train_lightning
from benchmarks.loader import endless_batches
from benchmarks.models import build_ours, build_ours_for, build_tutorial, ours_train_step
from benchmarks.preprocess import DataSet
from benchmarks.sizes import COCO_TRAIN_IMAGES, EXPANDABLE, TRAIN_WARMUP_STEPS, Sizes, sizes_from
from benchmarks.synthetic import special_ids, synthetic_batch, synthetic_captions
from benchmarks.timing import (cuda_peak_mib, cuda_peak_reset, measure_with_usage, per_step, rate,
                               setup_device, sync)


def bench_train(sizes: Sizes, device: torch.device, repeats: int, data: DataSet | None,
                loader_workers: int, rows: str | None = None) -> list[dict]:
    """The training rows, each in a fresh interpreter (see the module docstring).

    Every row runs :data:`TRAIN_WARMUP_STEPS` untimed steps, then ``repeats`` timed runs (one
    step each on a synthetic batch; ``train_loader_batches`` steps with the loader). ``rows``:
    a regular expression; only rows whose :func:`train_row_key` it matches (``re.search``) run.
    """
    base = {"entry": "benchmarks.train:train_row", "sizes": dataclasses.asdict(sizes),
            "device": str(device), "repeats": repeats}
    specs = []
    for fine_tune in (False, True):
        specs += [{**base, "kind": "ours", "fine_tune": fine_tune},
                  {**base, "kind": "tutorial", "fine_tune": fine_tune}]
    if data is not None:
        # With the loader in the loop: frozen always, plain and length-bucketed batches
        # (data.bucket_by_length, the coco experiments); fine-tuned on CUDA too (its COCO epoch
        # time is reported there; on the CPU it would add minutes and say nothing new). On
        # CUDA also with PyTorch's expandable-segments allocator (new caption-length mixes keep
        # asking the caching allocator for new block sizes; measured, it did not pay:
        # docs/performance.md), and two variants that locate the loader's cost: batches not
        # pinned, and the same loader's batches collected before the timed steps.
        data_spec = {"folder": str(data.folder), "name": data.name,
                     "vocab_size": data.vocab_size, "special_ids": data.special_ids}
        # (fine_tune, batches, expandable_segments, encoder CUDA graph); "lightning": the
        # bucketed row through train.py's Trainer, data module and per-step callbacks.
        variants = ([(False, "pinned", False, False), (False, "bucketed", False, False),
                     (False, "bucketed", False, True), (False, "lightning", False, False),
                     (False, "pinned", True, False), (False, "bucketed", True, False),
                     (True, "pinned", False, False), (True, "bucketed", False, False),
                     (True, "bucketed", True, False),
                     (False, "unpinned", False, False), (False, "preloaded", False, False)]
                    if device.type == "cuda"
                    else [(False, "pinned", False, False), (False, "bucketed", False, False),
                          (False, "lightning", False, False)])
        for fine_tune, variant, expandable, graph in variants:
            specs.append({**base, "kind": "loader", "fine_tune": fine_tune, "variant": variant,
                          "workers": loader_workers, "data": data_spec,
                          **({"cuda_alloc_conf": EXPANDABLE} if expandable else {}),
                          **({"encoder_cuda_graph": True} if graph else {})})
    if keep_applies(device):
        specs += [{**spec, "keep_freed_memory": True} for spec in specs]
    if rows is not None:
        specs = [spec for spec in specs if re.search(rows, train_row_key(spec))]
    return [row for spec in specs for row in isolated_rows(spec)]


def train_row_key(spec: dict) -> str:
    """``kind:encoder:variant`` of a training row's spec, for ``--train-rows``: e.g.
    ``ours:frozen:synthetic``, ``tutorial:fine-tuned:synthetic``,
    ``loader:frozen:bucketed+expandable``, ``loader:frozen:bucketed+graph``,
    ``loader:frozen:pinned+keep_freed_memory``."""
    variant = spec.get("variant", "synthetic")
    if spec.get("cuda_alloc_conf"):
        variant += "+expandable"
    if spec.get("encoder_cuda_graph"):
        variant += "+graph"
    if spec.get("keep_freed_memory"):
        variant += "+keep_freed_memory"
    return f"{spec['kind']}:{'fine-tuned' if spec['fine_tune'] else 'frozen'}:{variant}"


def train_row(spec: dict) -> dict:
    """One training row in this process; ``spec`` as built by :func:`bench_train`."""
    sizes = sizes_from(spec)
    device = torch.device(spec["device"])
    setup_device(device)
    torch.manual_seed(0)
    if spec["kind"] == "loader":
        data = spec["data"]
        dataset = DataSet(Path(data["folder"]), data["name"], data["vocab_size"],
                          data["special_ids"])
        if spec["variant"] == "lightning":
            return bench_train_lightning(sizes, device, spec["repeats"], dataset,
                                         spec["workers"], spec["fine_tune"])
        return bench_train_with_loader(sizes, device, spec["repeats"], dataset,
                                       spec["workers"], spec["fine_tune"], spec["variant"],
                                       expandable=bool(spec.get("cuda_alloc_conf")),
                                       cuda_graph=bool(spec.get("encoder_cuda_graph")))
    rng = np.random.default_rng(0)
    ids = special_ids(sizes)
    s, fine_tune = sizes.image_size, spec["fine_tune"]
    label = "fine-tuned encoder (blocks 2-4)" if fine_tune else "frozen encoder"
    if spec["kind"] == "ours":
        b, k = sizes.batch_images, sizes.captions_per_image
        batch = synthetic_batch(rng, sizes, ids)
        if device.type == "cuda":
            batch = {key: v.pin_memory() for key, v in batch.items()}
        module, optimizer = build_ours(sizes, device, fine_tune)
        step = ours_train_step(module, optimizer, device)
        cuda_peak_reset(device)
        times, usage = measure_with_usage(lambda: step(batch), repeats=spec["repeats"],
                                          device=device, warmup=TRAIN_WARMUP_STEPS)
        return rate(f"train {label}", "train", "ours", "captions/s", b * k, times,
                    images_per_s=b / statistics.median(times), batch=f"{b} images x {k} captions",
                    warmup_steps=TRAIN_WARMUP_STEPS, **per_step(usage, 1),
                    **cuda_peak_mib(device))

    # Tutorial: N caption rows, each with its own float image normalised on the CPU.
    n = sizes.tutorial_batch
    images = rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8)
    captions, lengths = synthetic_captions(rng, n, sizes, ids["pad_id"], ids["start_id"],
                                           ids["end_id"])
    dataset = tut.TutorialCaptionDataset(images, captions, lengths, captions_per_image=1)
    imgs, caps, caplens = torch.utils.data.default_collate([dataset[i] for i in range(n)])
    if device.type == "cuda":
        imgs, caps, caplens = imgs.pin_memory(), caps.pin_memory(), caplens.pin_memory()
    encoder, decoder, trainer = build_tutorial(sizes, device, fine_tune)
    cuda_peak_reset(device)
    times, usage = measure_with_usage(lambda: trainer.step(imgs, caps, caplens),
                                      repeats=spec["repeats"], device=device,
                                      warmup=TRAIN_WARMUP_STEPS)
    return rate(f"train {label}", "train", "tutorial", "captions/s", n, times,
                images_per_s=n / statistics.median(times), batch=f"{n} captions (one image each)",
                warmup_steps=TRAIN_WARMUP_STEPS, **per_step(usage, 1),
                    **cuda_peak_mib(device))


def bench_train_with_loader(sizes: Sizes, device: torch.device, repeats: int, data: DataSet,
                            workers: int, fine_tune: bool = False, variant: str = "pinned",
                            expandable: bool = False, cuda_graph: bool = False) -> dict:
    """Ours fed by CaptionH5Dataset + DataLoader (the real input pipeline).

    The same model, step and warm-up as the synthetic ``train frozen encoder`` (or fine-tuned)
    row; the only difference is where the batches come from (a new one from the loader every
    step). ``variant``: ``pinned`` (pin_memory on CUDA, as training runs), ``bucketed`` (the
    same with :class:`~captioner.data.dataset.LengthBucketSampler` batches), ``unpinned``, or
    ``preloaded`` (every batch the run needs taken from the loader before the timed steps, so
    the steps see the loader's batches without the loader running beside them).
    ``expandable``: the process was started with
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set by the caller; it only labels the
    row here). ``cuda_graph``: the frozen encoder
    replays a CUDA graph (``ImageEncoder(cuda_graph=True)``).
    """
    from captioner.data.dataset import CaptionH5Dataset

    dataset = CaptionH5Dataset(data.folder, data.name, "train",
                               captions_per_sample=sizes.captions_per_image)
    module, optimizer = build_ours_for(data, sizes, device, fine_tune, cuda_graph=cuda_graph)
    step = ours_train_step(module, optimizer, device)
    batches = endless_batches(dataset, sizes.batch_images, workers, device,
                              pin_memory=variant != "unpinned", bucketed=variant == "bucketed")
    n, warmup = sizes.train_loader_batches, sizes.train_loader_warmup
    if variant == "preloaded":
        taken = [next(batches) for _ in range(warmup + repeats * n)]
        batches.close()  # stops the loader's workers
        batches = iter(taken)
    decoder_steps = []  # per timed batch: max(lengths) - 1 steps of the decoder loop

    def run(count: int = n, record: bool = True) -> None:
        for _ in range(count):
            batch = next(batches)
            if record:
                decoder_steps.append(int(batch["lengths"].max()) - 1)
            step(batch)

    warmup_rates = []  # images/s of each window of warm-up steps
    for start in range(0, warmup, n):
        count = min(n, warmup - start)
        sync(device)
        began = time.perf_counter()
        run(count, record=False)
        sync(device)
        warmup_rates.append(count * sizes.batch_images / (time.perf_counter() - began))
    cuda_peak_reset(device)
    times, usage = measure_with_usage(run, repeats, device, warmup=0)
    per_s = n * sizes.batch_images / statistics.median(times)
    label = "fine-tuned encoder (blocks 2-4)" if fine_tune else "frozen encoder"
    label += {"pinned": " + HDF5 loader", "bucketed": " + HDF5 loader, length-bucketed batches",
              "unpinned": " + HDF5 loader (pin_memory=False)",
              "preloaded": ", HDF5 loader batches taken before the timed steps"}[variant]
    if expandable:
        label += ", expandable_segments allocator"
    if cuda_graph:
        label += ", encoder CUDA graph"
    return rate(f"train {label}", "train", "ours", "images/s",
                n * sizes.batch_images, times, loader_workers=workers, variant=variant,
                allocator="expandable_segments" if expandable else "default",
                encoder_cuda_graph=cuda_graph,
                **({"coco_epoch_min": COCO_TRAIN_IMAGES / per_s / 60.0}
                   if variant in ("pinned", "bucketed") else {}),
                captions_per_s=per_s * sizes.captions_per_image, steps_per_run=n,
                decoder_steps_per_batch=statistics.mean(decoder_steps), warmup_steps=warmup,
                warmup_images_per_s=warmup_rates, **per_step(usage, n), **cuda_peak_mib(device))

