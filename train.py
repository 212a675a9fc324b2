"""Train a captioner: python train.py [experiment=quickstart] [key=value ...] (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from captioner import run
from captioner.checkpoints import CheckpointError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run.train(cfg)
    except CheckpointError as e:  # an unreadable checkpoint: one line naming it, no traceback
        sys.exit(f"error: {e}")
    # Returned for Hydra sweepers (e.g. optuna) that optimise a value.
    return metrics.get("val/best_bleu4")


if __name__ == "__main__":
    main()
