"""ImageRateProgressBar: the training bar refreshes on a time interval, not after every step."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from captioner.callbacks import ImageRateProgressBar


@pytest.mark.parametrize("interval,refreshes", [(0.0, [1, 2, 3, 4, 5, 6]), (3600.0, [1, 6])])
def test_training_bar_refreshes_at_most_once_per_interval_and_at_the_last_batch(
        monkeypatch, tmp_path, interval, refreshes):
    """Each refresh reads the logged metrics off the device; with a long interval the bar
    refreshes at the first batch and the epoch's last, with 0 after every batch as Lightning's."""
    seen = []
    lightning_refresh = TQDMProgressBar.on_train_batch_end

    def counted(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append(batch_idx + 1)
        lightning_refresh(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", counted)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[ImageRateProgressBar(min_refresh_interval=interval)],
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(BoringModel())
    assert seen == refreshes


def test_negative_refresh_interval_is_refused():
    with pytest.raises(ValueError, match="min_refresh_interval"):
        ImageRateProgressBar(min_refresh_interval=-1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_bar_shows_the_loss_that_lightning_does_not_read_per_batch(tmp_path, accumulate):
    """train/loss is not a Lightning progress-bar metric (Lightning turns those into Python
    numbers after every batch: a sync per step on a GPU); the bar shows the step's loss itself,
    read when it refreshes: the logged value, also when Lightning divides the returned loss by
    accumulate_grad_batches."""
    import torch

    bar = ImageRateProgressBar(min_refresh_interval=0.0)
    seen = []

    class Model(BoringModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)["loss"]
            self.log("train/loss", loss, on_step=True)  # as CaptioningModule logs it with this bar
            return loss

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((dict(trainer.progress_bar_metrics), bar.train_progress_bar.postfix,
                         float(trainer.callback_metrics["train/loss"])))

    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accumulate_grad_batches=accumulate, callbacks=[bar, Probe()],
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Model())
    assert len(seen) == 4
    for pbar_metrics, postfix, loss in seen:
        assert "train/loss" not in pbar_metrics
        assert f"train/loss={loss:.3f}" in postfix
    assert isinstance(bar._loss, torch.Tensor) and not bar._loss.requires_grad
