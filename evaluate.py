"""Score a checkpoint: python evaluate.py [beam=5] [split=test] [ckpt_path=...] (see conf/evaluate.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from captioner import run
from captioner.checkpoints import CheckpointError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run.evaluate(cfg)
    except CheckpointError as e:  # an unreadable checkpoint: one line naming it, no traceback
        sys.exit(f"error: {e}")
    return summary["metrics"].get("bleu4_nltk")


if __name__ == "__main__":
    main()
