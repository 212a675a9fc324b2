"""Shared fixtures: seeds, and Hydra configs composed with tiny sizes under tmp_path."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Fixed seeds; one intra-op thread (tiny tensors on a 2-core machine run far faster so)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside the block (module-scoped fixtures run before the autouse one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_overrides(tmp_path: Path, num_train: int = 48, num_eval: int = 16) -> list[str]:
    """Overrides that turn the quickstart into a seconds-long run writing only under tmp_path."""
    return [
        "experiment=quickstart",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_root={tmp_path / 'outputs'}",
        f"paths.output_dir={tmp_path / 'outputs' / 'run'}",
        f"data.synthetic.num_train={num_train}",
        f"data.synthetic.num_val={num_eval}",
        f"data.synthetic.num_test={num_eval}",
        "data.num_workers=0",
        "data.batch_size=8",
        "model.decoder.embed_dim=16",
        "model.decoder.decoder_dim=16",
        "model.decoder.attention_dim=16",
        "model.num_log_examples=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def cfg_tiny(tmp_path):
    """The quickstart config shrunk to seconds, all paths under tmp_path."""
    return compose("train", tiny_overrides(tmp_path))
