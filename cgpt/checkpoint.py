"""Checkpoints: atomic saving, the resume point of an output folder, and loading a model back."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cgpt.config import ModelConfig
from cgpt.model import GPT

LAST = "last.ckpt"
COMPILE_PREFIX = "_orig_mod."
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # torch checkpoint_wrapper (defensive)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place.

    A crash or kill during a save leaves the previous checkpoint untouched and no partial file
    under the final name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def periodic_checkpoints(dirpath: str, every_n_steps: int = 200, keep_last: int = 2) -> ModelCheckpoint:
    """``last.ckpt`` (the resume point) every ``every_n_steps`` optimizer steps, plus the newest
    ``keep_last`` step-numbered checkpoints (older ones are deleted)."""
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=keep_last,
        save_last=True,
        every_n_train_steps=every_n_steps,
        save_on_train_epoch_end=False,
    )


def best_checkpoints(dirpath: str, save_top_k: int = 1) -> ModelCheckpoint:
    """The best ``save_top_k`` checkpoints by ``val/loss``, saved right after each validation."""
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="best-step{step:07d}-val{val/loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
        save_top_k=save_top_k,
        save_last=False,
        every_n_epochs=1,
        save_on_train_epoch_end=False,
    )


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A non-empty checkpoint file, or a complete sharded folder (FSDP: ``.metadata`` + ``meta.pt``;
    DeepSpeed: ``latest`` + its tag folder). Sharded folders are renamed into place only when whole."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size > 0
    if (path / ".metadata").is_file():
        return (path / "meta.pt").is_file()
    if (path / "latest").is_file():
        return (path / (path / "latest").read_text().strip()).is_dir()
    return False


def resume_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a re-run of the same command continues from, or None for a fresh start:
    ``last.ckpt`` when complete, else the newest complete step-numbered one (a crash between the two
    renames of a sharded save can leave ``last.ckpt`` missing for a moment)."""
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / LAST
    if is_complete_checkpoint(last):
        return last
    steps = []
    for p in checkpoint_dir.glob("*step*.ckpt"):
        m = re.search(r"step(\d+)", p.name)
        if m and not p.name.startswith(".") and is_complete_checkpoint(p):
            steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def _load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GPT's own state dict from a Lightning checkpoint (``model.`` and compile prefixes removed)."""
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for k, v in state.items():
        if k.startswith("model."):
            k = k[len("model.") :]
        out[k.replace(COMPILE_PREFIX, "").replace(CHECKPOINT_WRAPPER_PREFIX, "")] = v
    return out


def load_gpt(path: str | os.PathLike) -> GPT:
    """Rebuild the trained :class:`~cgpt.model.GPT` from a cgpt Lightning checkpoint file."""
    if Path(path).is_dir():  # a sharded FSDP / DeepSpeed checkpoint folder
        from cgpt.strategies import consolidate_checkpoint

        ckpt = consolidate_checkpoint(path)
    else:
        ckpt = _load(path)
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp:
        raise ValueError(f"{path}: not a cgpt checkpoint (no hyper_parameters.model)")
    model = GPT(ModelConfig.from_dict(dict(hp["model"])))
    state = model_state_dict(ckpt)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model
