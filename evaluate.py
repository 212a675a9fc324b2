"""Score a checkpoint: python evaluate.py [beam=5] [split=test] [ckpt_path=...] (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

from captioner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    summary = run.evaluate(cfg)
    return summary["metrics"].get("bleu4_nltk")


if __name__ == "__main__":
    main()
