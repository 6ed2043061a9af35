"""Lightning's side of checkpoints: atomic checkpoint files and the periodic / best checkpoint callbacks.

Formats, the resume point of a run folder and loading weights back live in :mod:`cgpt.weights`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cgpt.weights import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file through :func:`cgpt.weights.atomic_save` (temporary file, fsync,
    rename): a crash or kill during a save leaves the previous checkpoint untouched and no partial
    file under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, path)


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's step-interval checkpoint, plus one at the end of training.

    Lightning saves ``last.ckpt`` at the end of training only if it never saved one before, so a run
    whose ``max_steps`` is not a multiple of the interval ended with a ``last.ckpt`` up to
    ``every_n_steps - 1`` steps old: extending the run (a larger ``trainer.max_steps``) or fine-tuning
    from its folder started from there, not from the weights the run finished with.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or _saved_by_another(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def _saved_by_another(trainer: L.Trainer) -> bool:
    """Whether a callback that stops the run (the step guard's ``stop``, preemption) already saved
    ``last.ckpt`` at this step: they record the step in ``saved_step``."""
    return any(getattr(c, "saved_step", None) == trainer.global_step for c in trainer.callbacks)


def periodic_checkpoints(dirpath: str, every_n_steps: int = 200, keep_last: int = 2) -> ModelCheckpoint:
    """``last.ckpt`` (the resume point) every ``every_n_steps`` optimizer steps and at the end of
    training, plus the newest ``keep_last`` step-numbered checkpoints (older ones are deleted)."""
    return PeriodicCheckpoint(
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
