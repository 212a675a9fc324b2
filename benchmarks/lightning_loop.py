"""The training row run by Lightning's ``Trainer.fit`` the way ``train.py`` runs it."""

from __future__ import annotations

import resource
import statistics
import tempfile
import time

import torch

from benchmarks.models import build_ours_for
from benchmarks.preprocess import BENCH_MIN_WORD_FREQ, DataSet
from benchmarks.sizes import COCO_TRAIN_IMAGES, REPO_ROOT, Sizes
from benchmarks.timing import cuda_peak_mib, cuda_peak_reset, per_step, rate, sync, usage_per_run


def bench_train_lightning(sizes: Sizes, device: torch.device, repeats: int, data: DataSet,
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
