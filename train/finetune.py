"""Supervised fine-tuning of a Cerebras-GPT model on JSONL records: `python train/finetune.py [overrides]`.

See conf/finetune.yaml and docs/fine-tuning.md. Resuming, strategies, logging and checkpoints are
pretraining's (:mod:`cgpt.training`); only the module and datamodule differ.
"""

from __future__ import annotations

from pathlib import Path

from cgpt.startup import finish_process, heavy_imports, prepare_entry_point

prepare_entry_point(root=Path(__file__).resolve().parents[1])  # before the heavy imports: holds SLURM's USR1

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation loss (what Hydra sweepers optimise)."""
    with heavy_imports():  # here, so that --help and --cfg need no Lightning import
        from cgpt.training import finetune_components, fit

    return fit(OmegaConf.to_container(cfg, resolve=True), finetune_components)["val_loss"]


if __name__ == "__main__":
    main()
    finish_process()  # a rank whose run succeeded exits here, without the interpreter's teardown
