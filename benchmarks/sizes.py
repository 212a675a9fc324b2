"""The benchmark sizes (full, full on CUDA, quick) and the constants every family shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

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


def sizes_from(spec: dict) -> Sizes:
    """The :class:`Sizes` a child's JSON ``spec`` carries (JSON turned its tuples into lists)."""
    fields = spec["sizes"]
    return Sizes(**{**fields, "memory_images": tuple(fields["memory_images"]),
                    "extra_decode_batches": tuple(fields["extra_decode_batches"])})
