"""Decoding rows: greedy and beam-5 images/s of ours (batched) and beam-5 of the tutorial
reference (one image at a time), in fresh interpreters."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from benchmarks import tutorial_reference as tut
from benchmarks.isolation import isolated_rows, keep_applies
from benchmarks.models import build_ours, build_tutorial
from benchmarks.sizes import Sizes, sizes_from
from benchmarks.synthetic import special_ids
from benchmarks.timing import autocast, cuda_peak_mib, cuda_peak_reset, measure, rate, setup_device


def bench_decode(sizes: Sizes, device: torch.device, repeats: int) -> list[dict]:
    """Decoding rows, in fresh interpreters (both malloc settings on CPU/glibc)."""
    spec = {"entry": "benchmarks.decode:decode_rows", "kind": "decode",
            "sizes": dataclasses.asdict(sizes), "device": str(device), "repeats": repeats}
    specs = [spec] + ([{**spec, "keep_freed_memory": True}] if keep_applies(device) else [])
    return [row for s in specs for row in isolated_rows(s)]


def decode_rows(spec: dict) -> list[dict]:
    """The decoding rows in this process; ``spec`` as built by :func:`bench_decode`."""
    sizes = sizes_from(spec)
    device, repeats = torch.device(spec["device"]), spec["repeats"]
    setup_device(device)
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    s, steps = sizes.image_size, sizes.decode_max_len
    ids = special_ids(sizes)
    images = torch.from_numpy(rng.integers(0, 256, (sizes.decode_images, 3, s, s), dtype=np.uint8))
    if device.type == "cuda":
        images = images.pin_memory()
    module, _ = build_ours(sizes, device, fine_tune=False)
    captioner = module.captioner.eval()
    rows = []
    for batch in (sizes.decode_batch, *sizes.extra_decode_batches):
        for beam in (1, sizes.beam_size):
            def run() -> None:
                with autocast(device):
                    for start in range(0, len(images), batch):
                        captioner.generate(images[start:start + batch], beam_size=beam,
                                           max_len=steps)

            cuda_peak_reset(device)
            times = measure(run, repeats, device)
            name = "decode greedy (val)" if beam == 1 else f"decode beam-{beam} (test)"
            if batch != sizes.decode_batch:
                name += f", batch {batch}"
            rows.append(rate(name, "decode", "ours", "images/s", len(images), times,
                             batch=batch, steps=steps, **cuda_peak_mib(device)))
    module = captioner = None  # frees our model before the tutorial's is built

    encoder, decoder, _ = build_tutorial(sizes, device, fine_tune=False)
    encoder.eval()
    decoder.eval()
    n = sizes.tutorial_decode_images
    dataset = tut.TutorialCaptionDataset(images[:n].numpy(), np.zeros((n, 1), np.int64),
                                         np.ones(n, np.int64), captions_per_image=1)
    float_images = [dataset[i][0][None] for i in range(n)]  # the dataset's CPU normalisation

    def run_tutorial() -> None:
        for image in float_images:
            tut.beam_search_one(encoder, decoder, image.to(device), sizes.beam_size,
                                ids["start_id"], ids["end_id"], max_steps=steps)

    cuda_peak_reset(device)
    times = measure(run_tutorial, repeats, device)
    rows.append(rate(f"decode beam-{sizes.beam_size} (test)", "decode", "tutorial", "images/s", n,
                     times, batch=1, steps=steps, **cuda_peak_mib(device)))
    return rows
