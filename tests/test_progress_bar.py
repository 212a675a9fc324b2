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
