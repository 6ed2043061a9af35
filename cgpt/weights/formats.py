"""What a checkpoint path holds, where a run folder's resume point is, and consolidation.

Formats (:func:`checkpoint_format`):

- ``hf``: a Hugging Face GPT-2 folder (``config.json`` + safetensors / ``.bin`` weights);
- ``file``: a single-file Lightning checkpoint (single device, DDP, FSDP with full state dicts);
- ``fsdp``: a ``torch.distributed.checkpoint`` folder written by FSDP2 (``.metadata`` + ``meta.pt``);
- ``deepspeed``: a DeepSpeed ZeRO 1/2/3 folder (``latest`` + its tag folder);
- ``run``: a cgpt run folder (its resume checkpoint under ``checkpoints/``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cgpt.weights.state import gpt_state_dict

LAST = "last.ckpt"
SHARDED_FORMATS = ("fsdp", "deepspeed")


def checkpoint_format(path: str | os.PathLike) -> str:
    """``"hf"``, ``"file"``, ``"fsdp"``, ``"deepspeed"`` or ``"run"``; raises FileNotFoundError saying
    what was expected for anything else."""
    path = Path(path)
    if path.is_file():
        return "file"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give a cgpt .ckpt file, an FSDP or DeepSpeed checkpoint folder, "
            "a run folder or a Hugging Face folder"
        )
    if (path / "config.json").is_file():
        return "hf"
    if (path / ".metadata").is_file():
        return "fsdp"
    if (path / "latest").is_file():
        return "deepspeed"
    if resume_checkpoint(path / "checkpoints") or resume_checkpoint(path):
        return "run"
    raise FileNotFoundError(
        f"{path}: not a checkpoint: the folder has no config.json (Hugging Face), no .metadata (FSDP), "
        f"no latest (DeepSpeed) and no complete checkpoints/{LAST} or step*.ckpt (a cgpt run folder)"
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


def resolve_checkpoint(source: str | os.PathLike) -> tuple[str, Path]:
    """``(format, path)`` of a weights source, a run folder replaced by its resume checkpoint."""
    path = Path(os.path.expanduser(str(source)))
    kind = checkpoint_format(path)
    if kind == "run":
        path = resume_checkpoint(path / "checkpoints") or resume_checkpoint(path)
        kind = checkpoint_format(path)
    return kind, path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A cgpt training checkpoint as one Lightning checkpoint dict: a file as it is (memory-mapped,
    so reading the hyper-parameters of a 13B checkpoint loads no weights), a sharded folder
    consolidated in memory."""
    kind = checkpoint_format(path)
    if kind in SHARDED_FORMATS:
        return consolidate_checkpoint(path)
    if kind != "file":
        raise ValueError(f"{path}: a {kind} folder, not a cgpt training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def consolidate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Any cgpt checkpoint as one single-process Lightning checkpoint dict with fp32 weights.

    Keeps the training progress (global step, loops, lr schedule, data position, hyper-parameters),
    so ``resume=<file>`` continues it under another strategy. Optimizer state is kept where it can be
    rebuilt exactly (DDP, FSDP); DeepSpeed's partitioned Adam moments are dropped
    (``cgpt_consolidated.optimizer`` says which), and a resume then starts them fresh.
    """
    kind = checkpoint_format(path)
    path = Path(path)
    if kind == "file":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        optimizer = "optimizer_states" in ckpt
    elif kind == "fsdp":
        ckpt = _consolidate_dcp(path)
        optimizer = "optimizer_states" in ckpt
    elif kind == "deepspeed":
        ckpt = _consolidate_deepspeed(path)
        optimizer = False
    else:
        raise ValueError(f"{path}: a {kind} folder, not a cgpt training checkpoint to consolidate")
    state = gpt_state_dict(ckpt["state_dict"])
    ckpt["state_dict"] = {f"model.{k}": v.float() if v.is_floating_point() else v for k, v in state.items()}
    for sched in ckpt.get("lr_schedulers", []):
        # The schedule is a function of the step: keep the step count, take base lrs from the new optimizer.
        for key in ("base_lrs", "_last_lr"):
            sched.pop(key, None)
    ckpt["cgpt_consolidated"] = {"source": kind, "optimizer": optimizer}
    return ckpt


def _consolidate_dcp(path: Path) -> dict[str, Any]:
    """An FSDP2 sharded folder (DCP shards + meta.pt) -> a Lightning checkpoint with full tensors and
    the optimizer state re-keyed by parameter index, as ``torch.optim`` saves it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    ckpt = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    ckpt["state_dict"] = full.pop("state_dict", full.pop("model", {}))
    optimizers = [full[k] for k in sorted(k for k in full if k.startswith("optimizer_"))]
    ckpt["optimizer_states"] = [_index_keyed(o) for o in optimizers]
    return ckpt


def _index_keyed(optim_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names -> keyed by index (torch.optim's own format)."""
    index: dict[str, int] = {}
    groups = []
    for g in optim_state["param_groups"]:
        ids = []
        for name in g["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**g, "params": ids})
    state = {index[name]: s for name, s in optim_state["state"].items()}
    return {"state": state, "param_groups": groups}


def _consolidate_deepspeed(path: Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO 1/2/3 folder -> fp32 weights merged from all partitions + Lightning's client state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_file

    tag = (path / "latest").read_text().strip()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports its progress on stdout: keep a CLI's output clean
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    stage = 3 if any((path / tag).glob("zero_pp_rank_*_mp_rank_*_model_states.pt")) else 2
    client = torch.load(get_model_state_file(str(path / tag), stage), map_location="cpu", weights_only=False)
    ds_keys = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
               "dp_world_size", "mp_world_size", "buffer_names", "param_shapes", "frozen_param_shapes",
               "shared_params", "frozen_param_fragments", "ds_config", "ds_version", "data_sampler",
               "random_ltd", "sparse_tensor_module_names", "checkpoint_parallel_dimensions",
               "global_samples")  # fmt: skip
    ckpt = {k: v for k, v in client.items() if k not in ds_keys}
    ckpt["state_dict"] = state
    return ckpt
