"""Experiment loggers. W&B never waits on a network it cannot reach: offline unless configured."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cgpt.strategies import holds_full_model

RUN_ID_FILE = "wandb_run_id"


def wandb_has_credentials() -> bool:
    """True when a W&B key is configured (WANDB_API_KEY, or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: WANDB_MODE if set, else ``online`` with credentials and ``offline`` without."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_has_credentials() else "offline"


def wandb_logger(
    project: str = "cgpt",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    group: str | None = None,
    tags: list[str] | None = None,
    point: int | str | None = None,
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` that keeps one W&B run per output folder.

    The run id is stored in ``<save_dir>/wandb_run_id``: a requeued or re-run job with the same
    output folder continues the same run instead of starting a new one. ``point`` (a sweep point's
    number) is appended to the name; sweep points share ``group``.
    """
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            id_file.write_text(run_id + "\n")
    if point is not None and name:
        name = f"{name}-{point}"
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        mode=resolve_wandb_mode(mode),
        group=group,
        tags=list(tags or []),
        id=run_id,
        resume="allow",
        **kwargs,
    )


class SampleLogger(L.Callback):
    """After each validation, rank 0 generates a short text from ``prompt`` and logs the samples so
    far as a table (W&B ``log_text``; TensorBoard ``add_text``; other loggers: nothing).

    Generation uses the unwrapped model on rank 0 alone, so it runs only under strategies whose
    ranks each hold the whole model (:func:`cgpt.strategies.holds_full_model`: single device, DDP,
    ZeRO-1/2); strategies that shard the parameters (FSDP, ZeRO-3) skip it.
    """

    def __init__(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.8, top_k: int | None = 50,
                 seed: int = 0) -> None:  # fmt: skip
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.rows: list[list[Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or getattr(pl_module, "model", None) is None:
            return
        if not holds_full_model(trainer.strategy):
            return
        targets = [lg for lg in trainer.loggers if type(lg).__name__ in ("WandbLogger", "TensorBoardLogger")]
        if not targets:
            return
        text = self.generate(pl_module)
        self.rows.append([trainer.global_step, self.prompt, text])
        for lg in targets:
            if type(lg).__name__ == "WandbLogger":
                lg.log_text("samples", columns=["step", "prompt", "sample"], data=list(self.rows))
            else:
                lg.experiment.add_text("samples", f"**{self.prompt}**{text}", trainer.global_step)

    def generate(self, pl_module: L.LightningModule) -> str:
        """The continuation of the prompt (prompt excluded), sampled with a fixed seed."""
        from cgpt.data.tokenizer import get_tokenizer
        from cgpt.generate import generate

        tok = get_tokenizer()
        model = pl_module.model
        idx = torch.tensor([tok.encode(self.prompt)], device=pl_module.device)
        n = min(self.max_new_tokens, pl_module.model_config.block_size - idx.size(1))
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = generate(model, idx, n, temperature=self.temperature, top_k=self.top_k, generator=g)
        finally:
            model.train(was_training)
        return tok.decode(out[0, idx.size(1) :].tolist())
