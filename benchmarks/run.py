"""Throughput benchmarks of captioner, side by side with our re-implementation of the tutorial.

Run ``python -m benchmarks --help``. Groups (``--only``): ``train`` (captions/s and images/s of a
full optimisation step, frozen and fine-tuned encoder, plus ours with the real HDF5 loader in
the loop, and that row run by Lightning's ``Trainer.fit`` as ``train.py`` runs it), ``decode``
(greedy and beam-5 images/s), ``preprocess`` (JPEG -> HDF5 images/s with 0/1/2 worker
processes, full decode vs draft mode, a plain PIL loop, draft-mode fidelity in dB, peak RSS for
a small and a large Karpathy JSON) and ``loader`` (``CaptionH5Dataset`` + DataLoader images/s by
worker count) and ``evaluate`` (``evaluate.py`` end to end next to ``generate`` alone and the
tutorial's eval loop, see ``benchmarks/evaluate_loop.py``). Every number is the median of
``--repeats`` timed runs after one warm-up run (training rows: after two warm-up steps; the
loader-in-the-loop rows on CUDA after 160), with the min..max spread. Results are printed
as a table and written as JSON to ``benchmarks/results/<machine>-<time>.json``.

Each training and decoding row runs in a fresh interpreter after the same warm-up: the state an
earlier row leaves in the C allocator changes the cost of a CPU step by up to 2x (glibc returns
freed activation memory to the kernel and every step page-faults it back in; after a fine-tuned
step it no longer does), so rows sharing one process would depend on their order. On CPU with
glibc every training and decoding row is measured twice, on both sides: with the default malloc
settings and with ``captioner.allocator.keep_freed_memory`` (row names end in
``, keep_freed_memory``), which train.py and evaluate.py turn on for CPU runs.

All models use random weights (``pretrained=False``): nothing is downloaded. Random decoders
never emit ``<end>``, so both decoders run exactly ``decode_max_len`` steps per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks import evaluate_loop
    from benchmarks import tutorial_reference as tut
except ImportError:  # run as a script: python benchmarks/run.py
    import evaluate_loop  # type: ignore[no-redef]
    import tutorial_reference as tut  # type: ignore[no-redef]

from captioner.losses import caption_loss
from captioner.files import write_json_atomic

GROUPS = ("preprocess", "loader", "train", "decode", "evaluate")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval
# PyTorch's allocator setting for varying tensor sizes, tried on the CUDA loader rows.
EXPANDABLE = "expandable_segments:True"
TRAIN_WARMUP_STEPS = 2  # untimed optimisation steps before every training row
REPO_ROOT = Path(__file__).resolve().parent.parent
# Rows measured with glibc malloc keeping freed memory (captioner.allocator.keep_freed_memory,
# what train.py and evaluate.py turn on for CPU runs) get this suffix.
KEEP = ", keep_freed_memory"


@dataclass(frozen=True)
class Sizes:
    """Benchmark sizes; :data:`FULL` is the reported configuration, :data:`QUICK` a fast check."""

    arch: str = "resnet101"
    image_size: int = 256
    encoded_image_size: int = 14
    last_stage: int = 4
    batch_images: int = 32  # ours: images per training batch (x captions_per_image rows)
    captions_per_image: int = 5
    tutorial_batch: int = 32  # tutorial: caption rows per training batch (one image each)
    vocab_size: int = 10_000
    embed_dim: int = 512
    decoder_dim: int = 512
    attention_dim: int = 512
    max_len: int = 50  # caption rows hold max_len + 2 ids
    mean_words: float = 11.5  # COCO-like caption lengths: clipped normal over words
    std_words: float = 2.5
    decode_batch: int = 32  # ours: images per generate() call (evaluate.py's default is 128)
    extra_decode_batches: tuple[int, ...] = ()  # more generate() batch sizes, rows of their own
    decode_images: int = 32  # ours: images decoded per timed run
    tutorial_decode_images: int = 8  # tutorial: images decoded (one at a time) per timed run
    decode_max_len: int = 20  # steps decoded per image, both sides
    beam_size: int = 5
    preprocess_images: int = 2_000  # JPEGs per preprocessing run (fixed costs amortised, as on COCO)
    fidelity_images: int = 50  # first images compared with their pre-JPEG pixels
    memory_images: tuple[int, int] = (2_000, 20_000)  # Karpathy entries of the two peak-RSS runs
    memory_jpegs: int = 16  # distinct small JPEG files those entries point to
    raw_width: int = 640
    raw_height: int = 480
    loader_batch: int = 32
    loader_batches: int = 10  # batches per timed loader run
    train_loader_batches: int = 3  # training steps per timed run with the loader in the loop
    # Untimed steps before the loader rows' timed runs, timed in windows of train_loader_batches
    # steps (the JSON's warmup_images_per_s shows how the rate settles). On CUDA every new
    # caption-length mix brings new per-step shapes (allocator blocks, GEMM heuristics), so an
    # epoch's rate is a steady-state rate, reached only after many batches.
    train_loader_warmup: int = TRAIN_WARMUP_STEPS


FULL = Sizes()
# On CUDA a 32-image decoding run takes tens of milliseconds: decode more images per timed run.
# A GPU decodes a batch of 32 images at a cost set by kernel launches, not arithmetic; the
# batch-128 rows show what evaluate.py batch_size=128 gives there.
FULL_CUDA = dataclasses.replace(FULL, decode_images=128, tutorial_decode_images=16,
                                extra_decode_batches=(128,), train_loader_batches=20,
                                train_loader_warmup=160)
QUICK = Sizes(arch="resnet18", image_size=64, encoded_image_size=4, last_stage=3,
              batch_images=4, tutorial_batch=4, vocab_size=500, embed_dim=32, decoder_dim=32,
              attention_dim=32, decode_batch=4, decode_images=4, tutorial_decode_images=2,
              decode_max_len=8, preprocess_images=24, fidelity_images=8,
              memory_images=(200, 2_000), memory_jpegs=4, raw_width=160, raw_height=120,
              loader_batch=4, loader_batches=4, train_loader_batches=2)


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], repeats: int, device: torch.device,
            warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return measure_with_usage(fn, repeats, device, warmup)[0]


def measure_with_usage(fn: Callable[[], object], repeats: int, device: torch.device,
                       warmup: int = 1) -> tuple[list[float], dict]:
    """:func:`measure`, plus this process's mean minor page faults and CPU seconds per timed call.

    The page faults show what the allocator costs: memory handed back to the kernel after a
    step is zero-filled again, one fault per 4 KiB page, on the next step.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, usage_per_run(before, resource.getrusage(resource.RUSAGE_SELF), repeats)


def usage_per_run(before, after, runs: int) -> dict:
    """Mean minor page faults and user/system CPU seconds per run between two ``getrusage``."""
    return {"minor_faults_per_run": (after.ru_minflt - before.ru_minflt) / runs,
            "user_s_per_run": (after.ru_utime - before.ru_utime) / runs,
            "sys_s_per_run": (after.ru_stime - before.ru_stime) / runs}


def rate(name: str, group: str, impl: str, unit: str, amount: float, times: list[float],
         **extra) -> dict:
    """A result row: ``amount`` units per run over the run times, median and spread."""
    return {"name": name, "group": group, "impl": impl, "unit": unit,
            "value": amount / statistics.median(times), "low": amount / max(times),
            "high": amount / min(times), "runs": len(times), "times_s": times, **extra}


def setup_device(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (what training runs with); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else nullcontext())


def cuda_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}


# ---------------------------------------------------------------------------- synthetic data
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


# ---------------------------------------------------------------------------- models
def build_ours(sizes: Sizes, device: torch.device, fine_tune: bool, vocab_size: int | None = None,
               ids: dict[str, int] | None = None, dropout: float = 0.5, cuda_graph: bool = False):
    """``CaptioningModule`` (random weights) on ``device`` and its Adam optimiser."""
    from captioner.lit_module import CaptioningModule

    module = CaptioningModule(
        vocab_size=vocab_size or sizes.vocab_size, **(ids or special_ids(sizes)),
        encoder={"arch": sizes.arch, "encoded_image_size": sizes.encoded_image_size,
                 "pretrained": False, "fine_tune_from": 2, "last_stage": sizes.last_stage,
                 "channels_last": True, "cuda_graph": cuda_graph},
        decoder={"embed_dim": sizes.embed_dim, "decoder_dim": sizes.decoder_dim,
                 "attention_dim": sizes.attention_dim, "dropout": dropout},
        fine_tune_encoder=fine_tune)
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def build_ours_for(data: "DataSet", sizes: Sizes, device: torch.device, fine_tune: bool,
                   cuda_graph: bool = False):
    """:func:`build_ours` for the prepared benchmark data: its word map's size and special ids."""
    ids = {key: data.special_ids[key] for key in ("pad_id", "unk_id", "start_id", "end_id")}
    return build_ours(sizes, device, fine_tune, ids=ids, cuda_graph=cuda_graph,
                      vocab_size=max(sizes.vocab_size, data.vocab_size))


def ours_train_step(module, optimizer, device: torch.device) -> Callable[[dict], float]:
    """Forward + ``caption_loss`` + backward + value clipping at 5 + Adam, as Lightning runs it."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        with autocast(device):
            out = module.captioner(batch["images"], batch["captions"], batch["lengths"])
            loss = caption_loss(out.logits.float(), out.targets, out.mask, out.alphas.float()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 5.0)
        optimizer.step()
        return loss.detach()

    return step


def build_tutorial(sizes: Sizes, device: torch.device, fine_tune: bool, dropout: float = 0.5):
    encoder = tut.TutorialEncoder(sizes.arch, sizes.encoded_image_size, sizes.last_stage)
    encoder_dim = 64 * (4 if sizes.arch in ("resnet50", "resnet101", "resnet152") else 1) \
        * 2 ** (sizes.last_stage - 1)
    decoder = tut.TutorialDecoder(sizes.attention_dim, sizes.embed_dim, sizes.decoder_dim,
                                  sizes.vocab_size, encoder_dim, dropout)
    encoder.to(device)
    decoder.to(device)
    return encoder, decoder, tut.TutorialTrainer(encoder, decoder, fine_tune, device)


# ---------------------------------------------------------------------------- train
def bench_train(sizes: Sizes, device: torch.device, repeats: int, data: "DataSet | None",
                loader_workers: int, rows: str | None = None) -> list[dict]:
    """The training rows, each in a fresh interpreter (see the module docstring).

    Every row runs :data:`TRAIN_WARMUP_STEPS` untimed steps, then ``repeats`` timed runs (one
    step each on a synthetic batch; ``train_loader_batches`` steps with the loader). ``rows``:
    a regular expression; only rows whose :func:`train_row_key` it matches (``re.search``) run.
    """
    base = {"sizes": dataclasses.asdict(sizes), "device": str(device), "repeats": repeats}
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


def keep_applies(device: torch.device) -> bool:
    """Whether the ``keep_freed_memory`` rows are measured (CPU runs on glibc)."""
    return device.type == "cpu" and platform.libc_ver()[0] == "glibc"


_ROW_CHILD = """
import json, os, sys
spec = json.loads(sys.argv[1])
# Read when CUDA's caching allocator starts, so set before torch. Rows without a setting run
# the default allocator, whatever the benchmark's own environment says.
for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(name, None)
if spec.get("cuda_alloc_conf"):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = spec["cuda_alloc_conf"]
if spec.get("keep_freed_memory"):  # before torch allocates anything
    from captioner.allocator import keep_freed_memory
    assert keep_freed_memory(), "glibc malloc options could not be set"
from benchmarks.run import KEEP, decode_rows, train_row
rows = decode_rows(spec) if spec["kind"] == "decode" else [train_row(spec)]
for row in rows:
    if spec.get("keep_freed_memory"):
        row["name"] += KEEP
        row["malloc"] = "keep_freed_memory"
    print("BENCH_ROW " + json.dumps(row), flush=True)
"""


def run_child(code: str, args: dict, what: str) -> str:
    """Run ``code`` in a fresh interpreter with ``args`` as JSON in ``sys.argv[1]`` (the repo
    importable, as ``benchmarks``/``captioner``); returns its stdout, raises if it failed."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO_ROOT,
                          env=child_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({what}, exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


def isolated_rows(spec: dict) -> list[dict]:
    """The rows of ``spec`` (one training row, or the decoding rows) in a fresh interpreter
    (see the module docstring)."""
    what = f"{spec['kind']}, fine_tune={spec.get('fine_tune')}"
    rows = [json.loads(line[len("BENCH_ROW "):])
            for line in run_child(_ROW_CHILD, spec, what).splitlines()
            if line.startswith("BENCH_ROW ")]
    if not rows:
        raise RuntimeError(f"benchmark child printed no rows ({what})")
    for row in rows:  # progress, and a record should the run be stopped before its table
        print(f"  measured: {row['name']} [{row['impl']}] {row['value']:.4g} {row['unit']}",
              flush=True)
    return rows


def sizes_from(spec: dict) -> Sizes:
    """The :class:`Sizes` a child's JSON ``spec`` carries (JSON turned its tuples into lists)."""
    fields = spec["sizes"]
    return Sizes(**{**fields, "memory_images": tuple(fields["memory_images"]),
                    "extra_decode_batches": tuple(fields["extra_decode_batches"])})


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


def per_step(usage: dict, steps: int) -> dict:
    """:func:`measure_with_usage`'s per-run usage divided over ``steps`` optimisation steps."""
    return {key.replace("_per_run", "_per_step"): value / steps for key, value in usage.items()}


def bench_train_with_loader(sizes: Sizes, device: torch.device, repeats: int, data: "DataSet",
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


def bench_train_lightning(sizes: Sizes, device: torch.device, repeats: int, data: "DataSet",
                          workers: int, fine_tune: bool = False) -> dict:
    """The length-bucketed loader row run by ``Trainer.fit`` the way ``train.py`` runs it.

    The same model and data as :func:`bench_train_with_loader`; what is added is Lightning's
    loop and what ``train.py`` puts in it: the Trainer built from ``conf/trainer/{gpu,cpu}.yaml``
    (precision, value clipping at 5, logging every 50 steps), ``CaptionDataModule`` (its loader,
    ``LengthBucketSampler`` and the transfer hook that keeps the lengths on the host), the
    progress bar, ``LearningRateMonitor`` and ``ExactResume`` callbacks and the TensorBoard
    logger. Left out: the checkpoint and early-stopping callbacks and the LR schedule, which act
    only at validation or at epoch ends on its score (there is no validation here). Steps are
    timed by a callback in windows of ``train_loader_batches`` steps after
    ``train_loader_warmup``, synchronised at the window edges. The benchmark's
    train split is 50 batches, so an epoch ends every 50 steps (COCO's is 3,540): if anything,
    this row is slower than ``train.py`` on COCO.
    """
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from captioner.callbacks import ExactResume
    from captioner.data.datamodule import CaptionDataModule

    n, warmup = sizes.train_loader_batches, sizes.train_loader_warmup
    total = warmup + repeats * n
    module, _ = build_ours_for(data, sizes, device, fine_tune)
    # Its LR schedule steps per epoch on val/bleu4, and there is no validation here: the
    # optimiser alone (the schedule costs nothing per step).
    configure = module.configure_optimizers
    module.configure_optimizers = lambda: configure()["optimizer"]
    # The data module names only the real datasets; the benchmark's prepared files are named
    # for "bench". With no raw inputs at these paths, prepare_data uses the prepared files.
    datamodule = CaptionDataModule(
        "coco", data.folder, karpathy_json=data.folder / "no-raw-inputs.json",
        image_folder=data.folder / "no-raw-inputs", captions_per_image=sizes.captions_per_image,
        min_word_freq=BENCH_MIN_WORD_FREQ, max_len=sizes.max_len, image_size=sizes.image_size,
        batch_size=sizes.batch_images, num_workers=workers, bucket_by_length=True, seed=0)
    datamodule.dataset = "bench"
    if datamodule.data_name != data.name:
        raise RuntimeError(f"data module files {datamodule.data_name} != benchmark's {data.name}")

    class StepWindows(L.Callback):
        """Wall time of each window of ``n`` steps (warm-up windows apart) and usage."""

        def __init__(self):
            self.marks: list[float] = []
            self.decoder_steps: list[int] = []
            self.usage_start = None

        def _mark(self) -> None:
            sync(device)
            self.marks.append(time.perf_counter())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            if (step % n == 0 if step < warmup else (step - warmup) % n == 0):
                self._mark()
            if step == warmup:
                self.usage_start = resource.getrusage(resource.RUSAGE_SELF)
                cuda_peak_reset(device)
            if step >= warmup:
                self.decoder_steps.append(int(batch["lengths"].max()) - 1)

        def on_train_end(self, trainer, pl_module):
            self._mark()
            self.usage_end = resource.getrusage(resource.RUSAGE_SELF)

    timer = StepWindows()
    with tempfile.TemporaryDirectory(prefix="bench_lightning_") as tmp, \
            initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train",
                      overrides=[f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
                                 f"paths.output_dir={tmp}"])
        try:  # train.py's default logger; a machine without tensorboard gets the CSV logger
            logger = TensorBoardLogger(tmp, name="tensorboard", version="",
                                       default_hp_metric=False)
        except ModuleNotFoundError:
            logger = CSVLogger(tmp, name="csv", version="")
        trainer = instantiate(
            cfg.trainer, max_steps=total, max_epochs=-1, limit_val_batches=0,
            num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
            callbacks=[instantiate(cfg.callbacks.progress_bar),  # train.py's, as configured
                       LearningRateMonitor(logging_interval="epoch"), ExactResume(0), timer],
            logger=logger)
        trainer.fit(module, datamodule=datamodule)
    if trainer.global_step != total:
        raise RuntimeError(f"Lightning ran {trainer.global_step} steps, expected {total}")
    # The steps the marks were taken at: warm-up windows of n (the last may be shorter), then
    # the timed windows of n steps each, and the end.
    edges = list(range(0, warmup, n)) + list(range(warmup, total + 1, n))
    windows = list(zip(edges, edges[1:], timer.marks, timer.marks[1:]))
    times = [end - start for first, last, start, end in windows if first >= warmup]
    warmup_rates = [(last - first) * sizes.batch_images / (end - start)
                    for first, last, start, end in windows if last <= warmup]
    usage = usage_per_run(timer.usage_start, timer.usage_end, repeats)
    per_s = n * sizes.batch_images / statistics.median(times)
    label = "fine-tuned encoder (blocks 2-4)" if fine_tune else "frozen encoder"
    return rate(f"train {label} + HDF5 loader, length-bucketed batches, Lightning loop (train.py)",
                "train", "ours", "images/s", n * sizes.batch_images, times,
                loader_workers=workers, variant="lightning", allocator="default",
                logger=type(logger).__name__,
                encoder_cuda_graph=False, coco_epoch_min=COCO_TRAIN_IMAGES / per_s / 60.0,
                captions_per_s=per_s * sizes.captions_per_image, steps_per_run=n,
                decoder_steps_per_batch=statistics.mean(timer.decoder_steps),
                warmup_steps=warmup, warmup_images_per_s=warmup_rates, **per_step(usage, n),
                **cuda_peak_mib(device))


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


# ---------------------------------------------------------------------------- decode
def bench_decode(sizes: Sizes, device: torch.device, repeats: int) -> list[dict]:
    """Decoding rows, in fresh interpreters (both malloc settings on CPU/glibc)."""
    spec = {"kind": "decode", "sizes": dataclasses.asdict(sizes), "device": str(device),
            "repeats": repeats}
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


# ---------------------------------------------------------------------------- raw data
@dataclass
class DataSet:
    """A prepared HDF5 dataset (tutorial layout) the loader and training benchmarks read."""

    folder: Path
    name: str
    vocab_size: int
    special_ids: dict[str, int]


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


# ---------------------------------------------------------------------------- loader
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


# ---------------------------------------------------------------------------- same math?
def check_equivalence(seed: int = 0) -> dict:
    """Tiny CPU check that the tutorial reference and ours compute the same things.

    With shared weights, dropout off and eval-mode BatchNorm: the training loss and the
    decoder gradients agree (ours runs the encoder once per image, the tutorial once per
    caption row), and beam-3 search at batch size 1 (tutorial loop, ``<pad>``/``<start>``
    banned as ours does) picks the same tokens with the same score as our batched search.
    """
    cpu = torch.device("cpu")
    sizes = dataclasses.replace(QUICK, vocab_size=30, embed_dim=16, decoder_dim=16,
                                attention_dim=16, max_len=12)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = special_ids(sizes)
    module, _ = build_ours(sizes, cpu, fine_tune=False, dropout=0.0)
    ours = module.captioner.eval()
    with torch.no_grad():
        ours.decoder.fc.weight.mul_(20.0)  # peaky distributions, so beams do finish
    encoder, decoder, trainer = build_tutorial(sizes, cpu, fine_tune=False, dropout=0.0)
    encoder.resnet.load_state_dict(ours.encoder.resnet.state_dict())
    decoder.load_state_dict(ours.decoder.state_dict())
    encoder.eval()
    decoder.eval()

    b, k, s = 2, 3, sizes.image_size
    images = rng.integers(0, 256, (b, 3, s, s), dtype=np.uint8)
    captions, lengths = synthetic_captions(rng, b * k, sizes, ids["pad_id"], ids["start_id"],
                                           ids["end_id"])
    out = ours(torch.from_numpy(images), torch.from_numpy(captions).view(b, k, -1),
               torch.from_numpy(lengths).view(b, k))
    loss_ours = caption_loss(out.logits, out.targets, out.mask, out.alphas).loss
    dataset = tut.TutorialCaptionDataset(images, captions, lengths, captions_per_image=k)
    imgs, caps, caplens = torch.utils.data.default_collate([dataset[i] for i in range(b * k)])
    loss_tut, _ = trainer.loss(imgs, caps, caplens)
    loss_ours.backward()
    loss_tut.backward()
    grad_diff = max(float((p.grad - q.grad).abs().max()) for p, q in
                    zip(ours.decoder.parameters(), decoder.parameters()))

    hyps = ours.generate(torch.from_numpy(images), beam_size=3, max_len=sizes.max_len)
    same_tokens, score_diff, finished = True, 0.0, 0
    for i in range(b):
        tokens, score = tut.beam_search_one(encoder, decoder, imgs[i * k:i * k + 1], 3,
                                            ids["start_id"], ids["end_id"], sizes.max_len,
                                            banned_ids=(ids["pad_id"], ids["start_id"]))
        best = hyps[i][0]
        mine = best.tokens + ([ids["end_id"]] if best.finished else [])
        same_tokens &= mine == tokens
        score_diff = max(score_diff, abs(best.score - score))
        finished += int(best.finished)
    result = {"loss_abs_diff": abs(float(loss_ours.detach() - loss_tut.detach())), "decoder_grad_max_abs_diff": grad_diff,
              "beam_same_tokens": bool(same_tokens), "beam_score_max_abs_diff": score_diff,
              "beam_images_finished": f"{finished}/{b}"}
    result["ok"] = (result["loss_abs_diff"] < 1e-4 and grad_diff < 1e-4 and same_tokens
                    and score_diff < 1e-3)
    return result


# ---------------------------------------------------------------------------- ratios, table
PREP = "preprocess create_input_files num_workers="
TARGETS = [  # (label, numerator, denominator, target); a side is (name, impl[, field])
    # Like for like: both sides with the same malloc setting. Ours as train.py/evaluate.py
    # run it on the CPU is the keep_freed_memory row.
    ("train frozen: ours / tutorial captions/s, keep_freed_memory (both)",
     ("train frozen encoder" + KEEP, "ours"), ("train frozen encoder" + KEEP, "tutorial"),
     ">= 4x (CPU)"),
    ("train frozen: ours / tutorial captions/s, default malloc (both)",
     ("train frozen encoder", "ours"), ("train frozen encoder", "tutorial"), ">= 4x (CPU)"),
    ("train fine-tuned: ours / tutorial captions/s, keep_freed_memory (both)",
     ("train fine-tuned encoder (blocks 2-4)" + KEEP, "ours"),
     ("train fine-tuned encoder (blocks 2-4)" + KEEP, "tutorial"), "(report)"),
    ("train fine-tuned: ours / tutorial captions/s, default malloc (both)",
     ("train fine-tuned encoder (blocks 2-4)", "ours"),
     ("train fine-tuned encoder (blocks 2-4)", "tutorial"), "(report)"),
    ("train frozen: + HDF5 loader / synthetic batch images/s, keep_freed_memory",
     ("train frozen encoder + HDF5 loader" + KEEP, "ours"),
     ("train frozen encoder" + KEEP, "ours", "images_per_s"),
     "(report; ~1: loader not the bottleneck)"),
    ("train frozen: + HDF5 loader / synthetic batch images/s, default malloc",
     ("train frozen encoder + HDF5 loader", "ours"),
     ("train frozen encoder", "ours", "images_per_s"), "(report)"),
    ("train frozen + HDF5 loader: length-bucketed / plain batches images/s",
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"),
     ("train frozen encoder + HDF5 loader", "ours"), "(report)"),
    ("train frozen + HDF5 loader: length-bucketed / plain batches, keep_freed_memory",
     ("train frozen encoder + HDF5 loader, length-bucketed batches" + KEEP, "ours"),
     ("train frozen encoder + HDF5 loader" + KEEP, "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: expandable_segments / default allocator",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, expandable_segments allocator",
      "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: encoder CUDA graph / eager",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, encoder CUDA graph", "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: Lightning loop (train.py) / plain step",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, Lightning loop (train.py)",
      "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: Lightning loop (train.py) / plain step, "
     "keep_freed_memory",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, Lightning loop (train.py)"
      + KEEP, "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches" + KEEP, "ours"), "(report)"),
    ("train frozen + HDF5 loader, plain batches: expandable_segments / default allocator",
     ("train frozen encoder + HDF5 loader, expandable_segments allocator", "ours"),
     ("train frozen encoder + HDF5 loader", "ours"), "(report)"),
    ("train frozen, ours: keep_freed_memory / default malloc",
     ("train frozen encoder" + KEEP, "ours"), ("train frozen encoder", "ours"),
     "(report; CPU page-fault cost)"),
    ("train frozen, tutorial: keep_freed_memory / default malloc",
     ("train frozen encoder" + KEEP, "tutorial"), ("train frozen encoder", "tutorial"),
     "(report)"),
    ("decode beam-5: ours / tutorial images/s, keep_freed_memory (both)",
     ("decode beam-5 (test)" + KEEP, "ours"), ("decode beam-5 (test)" + KEEP, "tutorial"),
     ">= 3x CPU"),
    ("decode beam-5: ours / tutorial images/s" + " (default malloc on CPU)",
     ("decode beam-5 (test)", "ours"), ("decode beam-5 (test)", "tutorial"),
     ">= 3x CPU, >= 30x GPU"),
    ("decode beam-5: ours at batch 128 / tutorial images/s",
     ("decode beam-5 (test), batch 128", "ours"), ("decode beam-5 (test)", "tutorial"),
     ">= 30x GPU"),
    ("preprocess: 2 / 1 worker processes", (f"{PREP}2", "ours"), (f"{PREP}1", "ours"), ">= 1.7x"),
    ("preprocess per process: 1 worker / plain PIL", (f"{PREP}1", "ours"),
     ("preprocess plain PIL (full decode, resize)", "baseline"), ">= 2x"),
    ("preprocess draft gain: 1 worker default / full decode", (f"{PREP}1", "ours"),
     (f"{PREP}1 draft_min_ratio=None (full decode)", "ours"), "(report)"),
    ("preprocess: in-process / plain PIL", (f"{PREP}0", "ours"),
     ("preprocess plain PIL (full decode, resize)", "baseline"), "(report)"),
    ("preprocess: 2 workers / in-process", (f"{PREP}2", "ours"), (f"{PREP}0", "ours"), "(report)"),
]


def ratios(rows: list[dict]) -> list[dict]:
    by_key = {(r["name"], r["impl"]): r for r in rows}
    out = []
    for label, num, den, target in TARGETS:
        if num[:2] in by_key and den[:2] in by_key:
            value = (by_key[num[:2]][num[2] if len(num) > 2 else "value"]
                     / by_key[den[:2]][den[2] if len(den) > 2 else "value"])
            out.append({"ratio": label, "value": value, "target": target})
    for r in rows:
        if "coco_epoch_min" in r:
            frozen = "fine-tuned" not in r["name"]
            out.append({"ratio": f"COCO epoch (113k images x 5 captions), minutes, from "
                                  f"'{r['name']}'",
                        "value": r["coco_epoch_min"],
                        "target": "<= 3 min on one H100" if frozen else "(report)"})
        if "main_growth_mib_per_1000_images" in r:
            out += [{"ratio": "preprocess peak RSS growth per 1,000 images, main MiB",
                     "value": r["main_growth_mib_per_1000_images"],
                     "target": "(report; ~0: metadata streams)"},
                    {"ratio": "preprocess peak RSS growth per 1,000 images, worker MiB",
                     "value": r["worker_growth_mib_per_1000_images"], "target": "(report)"}]
    return out


def format_table(rows: list[dict], ratio_rows: list[dict]) -> str:
    width = max([58] + [len(r["name"]) for r in rows] + [len(r["ratio"]) for r in ratio_rows])
    lines = [f"{'benchmark':{width}} {'impl':9} {'median':>10} {'spread (min..max)':>22}  unit",
             "-" * (width + 52)]
    for r in rows:
        spread = f"{r['low']:.3g}..{r['high']:.3g}" if "low" in r else ""
        extra = ""
        if "minor_faults_per_step" in r and r.get("cuda_max_memory_allocated_mib") is None:
            extra = (f"  {r['minor_faults_per_step'] / 1e3:.3g}k page faults, "
                     f"{r['sys_s_per_step']:.2f} s sys per step")
        if "cuda_max_memory_allocated_mib" in r:
            extra = f"  peak {r['cuda_max_memory_allocated_mib']:.0f} MiB"
        if "decoder_steps_per_batch" in r:
            extra += f", {r['decoder_steps_per_batch']:.1f} decoder steps per batch"
        if "largest_worker_mib" in r:
            extra = f"  largest worker {r['largest_worker_mib']:.0f} MiB"
        if "mean_abs_diff" in r:
            extra = f"  mean |diff| {r['mean_abs_diff']:.3g}, max {r['max_abs_diff']} grey levels"
        lines.append(f"{r['name']:{width}} {r['impl']:9} {r['value']:10.4g} {spread:>22}  "
                     f"{r['unit']}{extra}")
    if ratio_rows:
        lines += ["", f"{'ratio':{width}} {'value':>10}  target", "-" * (width + 32)]
        lines += [f"{r['ratio']:{width}} {r['value']:10.3g}  {r['target']}" for r in ratio_rows]
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {','.join(GROUPS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per benchmark (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a fast check")
    parser.add_argument("--loader-workers", default=None,
                        help="comma-separated DataLoader worker counts (default: 0,1,2 on CPU, "
                             "0,4,8 on CUDA)")
    parser.add_argument("--train-rows", default=None, metavar="REGEX",
                        help="only the training rows whose kind:encoder:variant key matches, e.g. "
                             "'loader:frozen:bucketed' or 'loader:.*expandable' (keys: ours, "
                             "tutorial or loader; frozen or fine-tuned; synthetic, pinned, "
                             "bucketed, lightning, unpinned or preloaded, +expandable, +graph, "
                             "+keep_freed_memory)")
    parser.add_argument("--workdir", default=None,
                        help="where the JPEGs and HDF5 files go (default: a temp folder, removed)")
    parser.add_argument("--out", default=None,
                        help="JSON result path (default benchmarks/results/<machine>-<time>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"--only: unknown group(s) {unknown}; choose from {','.join(GROUPS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(args.device)
    setup_device(device)
    sizes = QUICK if args.quick else FULL_CUDA if device.type == "cuda" else FULL
    workers_list = ([int(w) for w in args.loader_workers.split(",")] if args.loader_workers
                    else [0, 1, 2] if device.type == "cpu" else [0, 4, 8])
    if args.quick and not args.loader_workers:
        workers_list = [0, 2]
    torch.manual_seed(0)

    check = check_equivalence()
    print(f"tutorial reference vs ours, same math: {'OK' if check['ok'] else 'MISMATCH'} {check}",
          flush=True)
    rows: list[dict] = []
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="captioner-bench-")
    workdir = Path(args.workdir or tmp.name).resolve()  # children run in the repo root
    started = time.perf_counter()
    try:
        data = None
        if "preprocess" in groups:
            prep_rows, data = bench_preprocess(sizes, args.repeats, workdir)
            rows += prep_rows
            print(format_table(prep_rows, []), flush=True)
        if data is None and {"loader", "train", "evaluate"} & set(groups):
            data = prepare_only(sizes, workdir)
        # Each group's table is printed as soon as it is measured, so a run stopped early
        # (a time limit on a lent GPU machine) still leaves its finished rows in the log.
        measured = {"loader": lambda: bench_loader(sizes, device, args.repeats, data, workers_list),
                    "train": lambda: bench_train(sizes, device, args.repeats, data,
                                                 max(workers_list), args.train_rows),
                    "decode": lambda: bench_decode(sizes, device, args.repeats),
                    # evaluate.py end to end (benchmarks/evaluate_loop.py)
                    "evaluate": lambda: evaluate_loop.bench_evaluate(sizes, device, args.repeats,
                                                                     data, workdir)}
        for group in (g for g in GROUPS if g in measured and g in groups):
            group_rows = measured[group]()
            rows += group_rows
            print(format_table(group_rows, []), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    ratio_rows = ratios(rows) + evaluate_loop.ratio_rows(rows)
    print()
    print(format_table(rows, ratio_rows))
    report = {"machine": machine_info(device), "quick": args.quick, "repeats": args.repeats,
              "groups": groups, "sizes": dataclasses.asdict(sizes), "equivalence": check, "wall_s": time.perf_counter() - started,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows, "ratios": ratio_rows}
    if args.out:
        out = Path(args.out)
    else:
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", platform.node() or "machine")
        out = RESULTS_DIR / f"{host}-{args.device}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(out, report)
    print(f"\nwrote {out}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
