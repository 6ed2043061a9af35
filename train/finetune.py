"""Supervised fine-tuning of a Cerebras-GPT model on JSONL records: `python train/finetune.py [overrides]`.

See conf/finetune.yaml and docs/notes/issue-9.md. Resuming, strategies, logging and checkpoints
are pretraining's (train/run.py); this file only supplies the SFT module and datamodule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from run import REPO_ROOT, container, fit, model_dict

from cgpt.config import ConfigError
from cgpt.sft import SFTDataModule, SFTModule


def sft_components(cfg: DictConfig) -> tuple[SFTModule, SFTDataModule]:
    """The SFT module (weights from ``init_from``, optional LoRA) and the JSONL datamodule."""
    module = SFTModule(
        model=model_dict(cfg), optim=container(cfg.optim), scheduler=container(cfg.scheduler),
        compile=cfg.compile, lora=container(cfg.get("lora")) or None, fused_loss=cfg.get("fused_loss", "auto"),
    )  # fmt: skip
    module.set_init_from(cfg.init_from)
    d = container(cfg.data)
    block_size = module.model_config.block_size
    max_seq_len = d["max_seq_len"] or block_size
    if max_seq_len > block_size:
        raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the model's context of {block_size}")
    datamodule = SFTDataModule(
        train_file=d["train_file"], max_seq_len=max_seq_len, val_file=d["val_file"], val_fraction=d["val_fraction"],
        micro_batch_size=d["micro_batch_size"], pack=d["pack"], on_bad_record=d["on_bad_record"],
        template=d["template"], seed=cfg.seed, val_batches=d["val_batches"],
    )  # fmt: skip
    if cfg.init_from:
        from cgpt.init_from import check_tokenizer

        tok = datamodule.tokenizer
        for note in check_tokenizer(cfg.init_from, "gpt2", tok.vocab_size, tok.eos_id):
            print(f"init_from: {note}", flush=True)
    out = Path(cfg.paths.output_dir)
    module.set_samples(datamodule.sample_prompts(cfg.sft.num_samples), cfg.sft.max_new_tokens, out / "samples.jsonl")
    module.set_exports(cfg.get("export_hf"), out / "adapters.pt")
    module.set_positions_per_row(datamodule.positions_per_row())  # tokens/s and MFU count real rows, not seq_len
    return module, datamodule


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    """Returns the final validation loss (what Hydra sweepers optimise)."""
    return fit(cfg, sft_components)["val_loss"]


if __name__ == "__main__":
    main()
