"""Train a captioner: python train.py [experiment=quickstart] [key=value ...] (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from captioner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run.train(cfg)
    # Returned for Hydra sweepers (e.g. optuna) that optimise a value.
    return metrics.get("val/best_bleu4")


if __name__ == "__main__":
    main()
