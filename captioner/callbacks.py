"""Lightning callbacks of our own: a progress bar that shows decoding speed in images/s."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ImageRateProgressBar(TQDMProgressBar):
    """Lightning's TQDM bars, plus images/s (this rank) on the validation and test bars.

    Validation and test generate captions with free-running search, so their speed is the
    decoding speed users care about; batches/s alone hides the batch size.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._images = 0
        self._started = time.perf_counter()

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
