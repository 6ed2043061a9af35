"""Pretrain a Cerebras-GPT model: `python train/pretrain.py [overrides]` (see README)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig
from run import REPO_ROOT, fit


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation loss (what Hydra sweepers optimise)."""
    return fit(cfg)["val_loss"]


if __name__ == "__main__":
    main()
