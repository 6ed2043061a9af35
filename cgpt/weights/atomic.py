"""Writes that never leave a half-written checkpoint under its final name.

A file is written next to its destination, flushed to disk and renamed into place; a folder (a
sharded checkpoint) is filled under a temporary name and then swapped in. A crash at any point
leaves either the previous version or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry lives in the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file that is fsync'd and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_path(path: str | os.PathLike) -> None:
    """Delete a checkpoint file or a sharded checkpoint folder (missing is fine)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """The name a folder checkpoint is written under before :func:`swap_into_place` (stale copies removed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove_path(tmp)
    return tmp


def swap_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Replace ``path`` (file or folder) by the finished ``tmp``: the old version is renamed aside, the
    new one renamed in, then the old one deleted. Every step is a rename, so a crash leaves a
    complete checkpoint under ``path`` or under a step-numbered name beside it."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old")
    remove_path(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    remove_path(old)
