"""Loader rows: ``CaptionH5Dataset`` + DataLoader images/s by worker count, and the endless
batches the loader-in-the-loop training rows draw from."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from benchmarks.preprocess import DataSet
from benchmarks.sizes import Sizes
from benchmarks.timing import measure, rate


def endless_batches(dataset, batch_size: int, workers: int, device: torch.device,
                    pin_memory: bool = True, bucketed: bool = False) -> Iterator[dict]:
    """Batches from a persistent-worker DataLoader, epoch after epoch (sampler epochs advance);
    pinned on CUDA unless ``pin_memory`` is False; length-bucketed when ``bucketed``."""
    from captioner.data.dataset import EpochAwareSampler, LengthBucketSampler, collate

    sampler = (LengthBucketSampler(dataset, dataset.max_caption_lengths, batch_size, seed=0)
               if bucketed else EpochAwareSampler(dataset, shuffle=True, seed=0))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory and device.type == "cuda", persistent_workers=workers > 0,
        drop_last=True,
        prefetch_factor=4 if workers > 0 else None)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_loader(sizes: Sizes, device: torch.device, repeats: int, data: DataSet,
                 workers_list: list[int]) -> list[dict]:
    from captioner.data.dataset import CaptionH5Dataset

    rows = []
    for workers in workers_list:
        dataset = CaptionH5Dataset(data.folder, data.name, "train",
                                   captions_per_sample=sizes.captions_per_image)
        batches = endless_batches(dataset, sizes.loader_batch, workers, device)
        n = sizes.loader_batches

        def run() -> None:
            for _ in range(n):
                batch = next(batches)
                if device.type == "cuda":
                    batch["images"].to(device, non_blocking=True)

        times = measure(run, repeats, device)
        rows.append(rate(f"loader CaptionH5Dataset workers={workers}", "loader", "ours",
                         "images/s", n * sizes.loader_batch, times, workers=workers,
                         batch=sizes.loader_batch, pin_memory=device.type == "cuda"))
        batches = None  # stops this loader's workers
    return rows
