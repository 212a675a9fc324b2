"""``evaluate.py`` end to end, next to ``Captioner.generate`` alone and the tutorial's eval loop.

``python -m benchmarks --only evaluate`` (part of the default run). On the benchmark's prepared
data (its test split), with one checkpoint of random weights (ResNet-101 at 256 px in the full
sizes, the quick sizes' small trunk with ``--quick``), beam 5 and ``decode_max_len`` steps:

- ``evaluate.py``: the real ``run.evaluate`` (checkpoint loading, ``CaptionDataModule`` and its
  test loader with the default workers, Lightning's test loop, the progress bar, BLEU
  accumulation, results written), batch 128 as ``evaluate.yaml`` has it. The row's value is the
  images/s that ``evaluate.py`` prints (its test loop); ``call_images_per_s`` is the whole
  ``run.evaluate`` call, checkpoint loading and setup included. The COCO scorers are off (a
  separate cost, and they need Java for METEOR).
- ``generate`` alone: the same checkpoint's ``Captioner.generate`` on the same images from
  memory, same batch and search (no attention rows kept, as evaluation keeps none): what the
  loop around the search costs is the gap between these two rows.
- the tutorial reference (``tutorial_reference.beam_search_one``, one image at a time) on the
  first ``tutorial_decode_images`` of those images, with the same vocabulary size.

Random decoders almost never emit ``<end>``, so every search runs the full step cap on every
side. Each row runs in a fresh interpreter with ``keep_freed_memory`` on CPU/glibc (what
``evaluate.py`` turns on for CPU runs). ``generate`` and the tutorial first caption one image
untimed (one-time costs: BatchNorm folding, first allocations); ``evaluate.py`` gets no warm-up,
as every ``python evaluate.py`` starts cold, so its one-time costs count against it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.isolation import isolated_rows, keep_applies

# The data module accepts the four dataset names; the benchmark's files get one of them.
EVAL_DATASET = "coco"
EVAL_BATCH = 128  # evaluate.yaml's batch_size
_SUFFIXES = ("IMAGES_{}.hdf5", "CAPTIONS_{}.json", "CAPLENS_{}.json", "REFERENCES_{}.json")

def bench_evaluate(sizes, device: torch.device, repeats: int, data, workdir: Path) -> list[dict]:
    """The three rows (evaluate.py, generate alone, tutorial), each in a fresh interpreter.

    Args:
        sizes: ``benchmarks.run.Sizes``; arch, image and decoder sizes, ``beam_size``,
            ``decode_max_len`` and ``tutorial_decode_images`` are used.
        device: CPU or CUDA.
        repeats: timed runs per row (median), after one warm-up run.
        data: ``benchmarks.run.DataSet``, the prepared benchmark data.
        workdir: where the checkpoint, the renamed data view and evaluate's outputs go.

    Returns:
        Result rows as ``benchmarks.run.rate`` builds them.
    """
    folder = data_view(data, workdir / "evaluate_data")
    ckpt = write_checkpoint(sizes, data, folder, workdir / "evaluate_random.ckpt")
    spec = {"entry": "benchmarks.evaluate_loop:evaluate_row", "sizes": dataclasses.asdict(sizes),
            "device": str(device), "repeats": repeats, "ckpt": str(ckpt), "data_folder": str(folder),
            "workdir": str(workdir), "keep_freed_memory": keep_applies(device)}
    return [row for kind in ("evaluate", "generate", "tutorial")
            for row in isolated_rows({**spec, "kind": kind})]


def ratio_rows(rows: list[dict]) -> list[dict]:
    """evaluate.py against the tutorial (the issue's >= 3x) and against generate alone."""
    by_impl = {r["impl"]: r for r in rows if r.get("group") == "evaluate"}
    out = []
    if {"evaluate.py", "tutorial"} <= set(by_impl):
        out.append({"ratio": "evaluate.py beam-5 end to end / tutorial eval loop images/s",
                    "value": by_impl["evaluate.py"]["value"] / by_impl["tutorial"]["value"],
                    "target": ">= 3x CPU"})
    if {"evaluate.py", "generate"} <= set(by_impl):
        out.append({"ratio": "evaluate.py beam-5 end to end / generate alone images/s",
                    "value": by_impl["evaluate.py"]["value"] / by_impl["generate"]["value"],
                    "target": ">= 0.8"})
    return out


def data_view(data, folder: Path) -> Path:
    """A folder of links to the benchmark's prepared files under a dataset name the data
    module accepts (``coco_5_cap_per_img_<n>_min_word_freq``)."""
    name = data.name.replace("bench", EVAL_DATASET, 1)
    folder.mkdir(parents=True, exist_ok=True)
    links = {f"WORDMAP_{name}.json": f"WORDMAP_{data.name}.json"}
    for split in ("TRAIN", "VAL", "TEST"):
        links.update({f"{split}_{s.format(name)}": f"{split}_{s.format(data.name)}"
                      for s in _SUFFIXES})
    for link, target in links.items():
        source = Path(data.folder) / target
        if source.exists() and not (folder / link).exists():
            os.symlink(source.resolve(), folder / link)
    return folder


def write_checkpoint(sizes, data, folder: Path, path: Path) -> Path:
    """A train.py-style checkpoint of a random-weight model for the benchmark's word map."""
    from benchmarks.models import save_module_checkpoint
    from captioner.lit_module import CaptioningModule
    from captioner.vocab import WordMap

    torch.manual_seed(0)
    word_map = WordMap.load(Path(data.folder) / f"WORDMAP_{data.name}.json")
    min_word_freq = int(data.name.split("_cap_per_img_")[1].split("_")[0])
    data_cfg = {"_target_": "captioner.data.datamodule.CaptionDataModule",
                "dataset": EVAL_DATASET, "data_folder": str(folder), "karpathy_json": None,
                "image_folder": None, "captions_per_image": 5, "min_word_freq": min_word_freq,
                "max_len": sizes.max_len, "image_size": sizes.image_size}
    model = CaptioningModule(
        vocab_size=len(word_map), **word_map.special_ids,
        encoder={"arch": sizes.arch, "encoded_image_size": sizes.encoded_image_size,
                 "pretrained": False, "fine_tune_from": 2, "last_stage": sizes.last_stage},
        decoder={"embed_dim": sizes.embed_dim, "decoder_dim": sizes.decoder_dim,
                 "attention_dim": sizes.attention_dim, "dropout": 0.5},
        data={"name": data.name, "fingerprint": None}, word_map=word_map,
        run_config={"data": data_cfg, "task_name": "train"})
    return save_module_checkpoint(model, path)


def test_images(data_folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """(N, 3, S, S) uint8, the prepared test split's images in file order."""
    import h5py

    path = next(Path(data_folder).glob("TEST_IMAGES_*.hdf5"))
    with h5py.File(path, "r") as h5:
        return torch.from_numpy(h5["images"][:limit])


def evaluate_row(spec: dict) -> dict:
    """One row in this process; ``spec`` as :func:`bench_evaluate` builds it."""
    from benchmarks.sizes import sizes_from
    from benchmarks.timing import measure, rate, setup_device

    sizes = sizes_from(spec)
    device, repeats, kind = torch.device(spec["device"]), spec["repeats"], spec["kind"]
    setup_device(device)
    torch.manual_seed(0)
    steps, beam = sizes.decode_max_len, sizes.beam_size
    name = f"evaluate beam-{beam} (test split, {sizes.arch} {sizes.image_size} px)"
    common = {"batch": EVAL_BATCH, "steps": steps, "beam": beam,
              "malloc": "keep_freed_memory" if spec.get("keep_freed_memory") else "default"}
    if kind == "evaluate":
        summaries: list[dict] = []
        cfg = evaluate_config(spec, device, steps, beam)
        from captioner import run

        times = measure(lambda: summaries.append(run.evaluate(cfg)), repeats, device, warmup=0)
        loop = [s["seconds"] for s in summaries]  # the test loops
        n = summaries[-1]["num_images"]
        return rate(name, "evaluate", "evaluate.py", "images/s", n, loop,
                    call_images_per_s=n / float(np.median(times)), call_times_s=times,
                    **common)
    if kind == "generate":
        from captioner.lit_module import CaptioningModule

        images = test_images(spec["data_folder"])
        if device.type == "cuda":
            images = images.pin_memory()
        captioner = CaptioningModule.load_from_checkpoint(
            spec["ckpt"], map_location=device, weights_only=True).captioner.eval()
        precision = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                     else torch.autocast("cpu", enabled=False))

        def run_generate(images: torch.Tensor = images) -> None:
            with precision:
                for start in range(0, len(images), EVAL_BATCH):
                    captioner.generate(images[start:start + EVAL_BATCH], beam_size=beam,
                                       max_len=steps, return_alphas=False)

        run_generate(images[:1])  # the warm-up
        times = measure(run_generate, repeats, device, warmup=0)
        return rate(name, "evaluate", "generate", "images/s", len(images), times, **common)
    return tutorial_rate(sizes, spec, device, repeats, name, steps, beam)


def tutorial_rate(sizes, spec: dict, device: torch.device, repeats: int, name: str, steps: int,
                  beam: int) -> dict:
    """The tutorial's eval loop (one image at a time, CPU-normalised floats) on the first
    ``tutorial_decode_images`` test images, random weights, the word map's vocabulary size."""
    from benchmarks import tutorial_reference as tut
    from benchmarks.models import build_tutorial
    from benchmarks.timing import measure, rate
    from captioner.vocab import WordMap

    word_map = WordMap.load(next(Path(spec["data_folder"]).glob("WORDMAP_*.json")))
    ids = word_map.special_ids
    n = sizes.tutorial_decode_images
    images = test_images(spec["data_folder"], n).numpy()
    n = len(images)
    encoder, decoder, _ = build_tutorial(dataclasses.replace(sizes, vocab_size=len(word_map)),
                                         device, fine_tune=False)
    encoder.eval()
    decoder.eval()
    dataset = tut.TutorialCaptionDataset(images, np.zeros((n, 1), np.int64), np.ones(n, np.int64),
                                         captions_per_image=1)
    float_images = [dataset[i][0][None] for i in range(n)]  # the tutorial's CPU normalisation

    def run_tutorial(images: list = float_images) -> None:  # as decode_rows runs it
        for image in images:
            tut.beam_search_one(encoder, decoder, image.to(device), beam, ids["start_id"],
                                ids["end_id"], max_steps=steps)

    run_tutorial(float_images[:1])  # the warm-up
    times = measure(run_tutorial, repeats, device, warmup=0)
    return rate(name, "evaluate", "tutorial", "images/s", n, times, batch=1, steps=steps,
                beam=beam)


def evaluate_config(spec: dict, device: torch.device, steps: int, beam: int):
    """``evaluate.yaml`` composed as ``python evaluate.py beam=5 max_len=<steps>`` would be."""
    from hydra import compose, initialize_config_dir

    from benchmarks.sizes import REPO_ROOT

    out = Path(spec["workdir"]) / "evaluate_outputs"
    overrides = [f"ckpt_path={spec['ckpt']}", f"beam={beam}", f"max_len={steps}",
                 f"batch_size={EVAL_BATCH}", "coco_metrics=false",
                 f"paths.output_root={out}", f"paths.output_dir={out / 'run'}",
                 f"data.data_folder={spec['data_folder']}",
                 "trainer=" + ("gpu" if device.type == "cuda" else "cpu")]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)

