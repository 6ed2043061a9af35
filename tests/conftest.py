"""Shared fixtures: a tiny prepared dataset and the repository paths."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the entry points set before composing: conf/paths resolves ${oc.env:CGPT_ROOT} (tests compose in-process).
os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))
# Measured peaks (cgpt.hardware.cached_peak_flops) go to a cache of this session, not the user's.
os.environ.setdefault("CGPT_CACHE_DIR", tempfile.mkdtemp(prefix="cgpt-test-cache-"))


def load_script(path: Path) -> ModuleType:
    """An entry-point script (``slurm/submit.py``, ...) imported as a module, by path: scripts are
    not a package, and no test puts a script folder on the import path."""
    spec = importlib.util.spec_from_file_location(f"cgpt_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = REPO_ROOT / "data" / "corpus" / "shakespeare.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first few Shakespeare works, prepared at seq_len 64 into several small shards."""
    import gzip

    from cgpt.data.prepare import prepare

    src = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with gzip.open(CORPUS, "rt") as f, open(src, "w") as out:
        for _, line in zip(range(6), f):
            out.write(line)
    out_dir = tmp_path_factory.mktemp("prepared")
    prepare([str(src)], out_dir, seq_len=64, val_every=3, shard_size_mb=0.1, log=lambda m: None)
    return out_dir


def run_script(args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a repository script in a subprocess; fail with its output on a non-zero exit."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc
