"""Lightning callbacks of our own: exact resume, and a progress bar that shows images/s."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class ImageRateProgressBar(TQDMProgressBar):
    """Lightning's TQDM bars, plus images/s (this rank) on the validation and test bars, and a
    training bar that refreshes at most every ``min_refresh_interval`` seconds.

    Validation and test generate captions with free-running search, so their speed is the
    decoding speed users care about; batches/s alone hides the batch size.

    The training bar shows the step's loss (``train/loss``), read off the device when the bar
    refreshes: a host-device synchronisation, and redrawing the bar costs the host too. (The
    loss is not a Lightning progress-bar metric, which Lightning would read after every batch.)
    A training step on one GPU takes tens of milliseconds and is bound by the host (see
    docs/performance.md), so refreshing after every step would stall it every step. With the
    interval the bar refreshes every few steps on a GPU and after every step on a CPU, whose
    steps take seconds; the last batch of an epoch always refreshes.

    Args:
        refresh_rate, process_position, leave: as Lightning's ``TQDMProgressBar``.
        min_refresh_interval: seconds between refreshes of the training bar; 0 refreshes it
            every ``refresh_rate`` batches, as Lightning does.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 min_refresh_interval: float = 0.5):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if min_refresh_interval < 0:
            raise ValueError(f"min_refresh_interval={min_refresh_interval}; must be >= 0 seconds")
        self.min_refresh_interval = float(min_refresh_interval)
        self._last_train_refresh = float("-inf")
        self._loss: torch.Tensor | None = None  # the latest step's, on its device
        self._loss_scale = 1
        self._images = 0
        self._started = time.perf_counter()

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._loss is not None:  # waits for the step's loss
            metrics["train/loss"] = f"{float(self._loss) * self._loss_scale:.3f}"
        return metrics

    def on_train_epoch_start(self, trainer, *args) -> None:
        self._loss = None
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
            # Lightning divides the returned loss by accumulate_grad_batches; the bar shows the step's.
            self._loss = outputs["loss"].detach()
            self._loss_scale = trainer.accumulate_grad_batches
        bar = self._train_progress_bar
        last = bar is not None and batch_idx + 1 == bar.total
        now = time.perf_counter()
        if not last and now - self._last_train_refresh < self.min_refresh_interval:
            return
        self._last_train_refresh = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _reset_rate(self) -> None:
        self._images = 0
        self._started = time.perf_counter()

    def _show_rate(self, bar, batch: Any) -> None:
        if bar is None or not isinstance(batch, dict) or "images" not in batch:
            return
        self._images += int(batch["images"].shape[0])
        rate = self._images / max(time.perf_counter() - self._started, 1e-9)
        bar.set_postfix({"img/s": f"{rate:.1f}"}, refresh=False)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_rate()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_rate()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._show_rate(self.val_progress_bar if self._val_progress_bar is not None else None, batch)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._show_rate(self.test_progress_bar if self._test_progress_bar is not None else None, batch)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


class ExactResume(L.Callback):
    """What Lightning's checkpoints leave out for an exact resume from an epoch-end checkpoint.

    * Random state: the global RNGs (torch, numpy, random) are reseeded from ``(seed, epoch)``
      at the start of every training epoch and from ``(seed, epoch, batch_idx)`` before every
      training batch, so dropout masks do not depend on whether earlier epochs ran in this
      process, nor on when Lightning creates the loader iterator after a restart (creating it
      draws a number from the global generator). The data order is already a function of
      ``(seed, epoch)`` (see ``EpochAwareSampler``). DataLoader worker seeds come from the
      generator when the iterator is created; the datasets draw no random numbers in workers.
    * Epoch-interval LR schedulers: checkpoints are written at the end of the epoch, before
      Lightning steps the schedulers, and Lightning skips that step when it restarts from such a
      checkpoint (it does not store the monitored value). The callback stores the monitored value
      and each scheduler's ``last_epoch`` in the checkpoint and, after a restart, performs the
      missing step once, before the first resumed epoch; a scheduler that was stepped is left alone.
      ``train()`` puts this callback first, so ``LearningRateMonitor`` logs the stepped rate.

    Args:
        seed: the run's seed (``cfg.seed``).
    """

    KEY = "captioner_exact_resume"

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._pending: list[dict[str, Any]] | None = None

    def derived_seed(self, *keys: int) -> int:
        """A 32-bit seed for ``(seed, *keys)``, the same on every rank (like ``seed_everything``)."""
        return int(np.random.SeedSequence([self.seed, *map(int, keys)]).generate_state(1)[0])

    @staticmethod
    def _reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            self._step_missed_schedulers(trainer)
        self._reseed(self.derived_seed(trainer.current_epoch))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._reseed(self.derived_seed(trainer.current_epoch, batch_idx))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        schedulers = []
        for config in trainer.lr_scheduler_configs:
            value = trainer.callback_metrics.get(config.monitor) if config.monitor else None
            schedulers.append({"interval": config.interval, "monitor": config.monitor,
                               "value": None if value is None else float(value),
                               "last_epoch": int(getattr(config.scheduler, "last_epoch", -1))})
        checkpoint[self.KEY] = {"epoch": trainer.current_epoch, "schedulers": schedulers}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.KEY)
        self._pending = None if state is None else state["schedulers"]
        self._saved_epoch = None if state is None else state["epoch"]

    def _step_missed_schedulers(self, trainer: L.Trainer) -> None:
        saved, self._pending = self._pending, None
        if trainer.current_epoch <= self._saved_epoch:  # restarted inside the saved epoch
            return
        for config, state in zip(trainer.lr_scheduler_configs, saved):
            scheduler = config.scheduler
            if config.interval != "epoch" or getattr(scheduler, "last_epoch", None) != state["last_epoch"]:
                continue
            if (self._saved_epoch + 1) % config.frequency:  # Lightning would not step it then either
                continue
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if state["value"] is None:
                    log.warning("resume: %s was not logged when the checkpoint was written; the LR "
                                "scheduler's step for epoch %d is skipped", state["monitor"], self._saved_epoch)
                    continue
                scheduler.step(state["value"])
            else:
                scheduler.step()
            log.info("resume: stepped the LR scheduler for epoch %d (%s=%s), as the uninterrupted run did",
                     self._saved_epoch, state["monitor"], state["value"])
