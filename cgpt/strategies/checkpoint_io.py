"""Checkpoint folders written by every rank at once (FSDP2 and DeepSpeed), swapped in atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.strategies import Strategy

from cgpt.weights import remove_path, swap_into_place, temporary_sibling


def remove_checkpoint(strategy: Strategy, filepath: str | os.PathLike) -> None:
    """Rank 0 deletes a checkpoint, a file or a sharded folder."""
    if strategy.is_global_zero:
        remove_path(filepath)


def atomic_dir_save(strategy: Strategy, filepath: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Run ``save(tmp_path)`` on every rank, then let rank 0 swap ``tmp_path`` into ``filepath``.

    A crash before the swap leaves the previous checkpoint untouched; the swap itself is a pair of
    renames (:func:`cgpt.weights.swap_into_place`).
    """
    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(f".{path.name}.tmp")
    if strategy.is_global_zero:
        temporary_sibling(path)
    strategy.barrier("cgpt_ckpt_tmp")
    save(tmp)
    strategy.barrier("cgpt_ckpt_saved")
    if strategy.is_global_zero:
        swap_into_place(tmp, path)
    strategy.barrier("cgpt_ckpt_swapped")
