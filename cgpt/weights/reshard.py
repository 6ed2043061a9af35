"""Checkpoints across world sizes: who wrote a checkpoint, whether this run can resume it, and the
DeepSpeed universal checkpoint that lets ZeRO state move to another number of ranks.

- :func:`checkpoint_world_size`: how many ranks wrote a checkpoint (None for a single full file).
- :func:`checkpoint_topology`: what the run that wrote it recorded (ranks, micro-batch, accumulation).
- :func:`check_resume`: refuse, before training, a checkpoint of another model shape or of another
  strategy family than the run's, with a message that says what to do instead.
- :func:`deepspeed_universal`: a DeepSpeed ZeRO folder as a DeepSpeed *universal* checkpoint (fp32
  weights, Adam moments and step per parameter, world-size free), written next to it atomically.

A single-file checkpoint (DDP, one device, consolidated) holds full tensors: it resumes at any world
size as it is. An FSDP2 folder (torch.distributed.checkpoint) stores DTensor shards with their global
shapes and offsets, so DCP reshards it on load at any world size. A DeepSpeed folder stores flat
per-rank partitions that only the writing world size can read: it goes through the universal form.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cgpt.config import ConfigError
from cgpt.weights.atomic import remove_path, swap_into_place, temporary_sibling
from cgpt.weights.formats import checkpoint_format
from cgpt.weights.state import gpt_state_dict

UNIVERSAL_SUFFIX = ".universal"  # <checkpoint>.universal/: the converted copy, next to the original
TOPOLOGY_KEY = "cgpt_topology"  # what cgpt.checkpoint.TopologyRecorder stores in every checkpoint
# Which strategy kinds read which checkpoint format directly (the registry's kinds).
FAMILIES = {"file": ("auto", "ddp", "fsdp"), "fsdp": ("fsdp",), "deepspeed": ("deepspeed",)}


class ResumeError(ConfigError):
    """The checkpoint cannot be resumed by this run; the message says what to change."""


@dataclass(frozen=True)
class Topology:
    """How the run that wrote a checkpoint was laid out (None where an older checkpoint did not say)."""

    world_size: int | None
    micro_batch_size: int | None = None
    accumulate_grad_batches: int | None = None


def _deepspeed_tag_dir(path: Path) -> Path:
    return path / (path / "latest").read_text().strip()


def _deepspeed_model_states(path: Path) -> Path:
    """The rank-0 model-states file of a DeepSpeed folder (client state: Lightning's progress, shapes)."""
    tag_dir = _deepspeed_tag_dir(path)
    zero3 = sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    return zero3[0] if zero3 else tag_dir / "mp_rank_00_model_states.pt"


def _client_state(path: Path, kind: str) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (memory-mapped: no weights are read)."""
    if kind == "file":
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if kind == "fsdp":
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return torch.load(_deepspeed_model_states(path), map_location="cpu", weights_only=False, mmap=True)


def checkpoint_world_size(path: str | os.PathLike) -> int | None:
    """The number of ranks that wrote a sharded checkpoint (one DCP file or one ZeRO optimizer
    partition per rank); None for a single-file checkpoint, which holds full tensors."""
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "fsdp":
        return len(list(path.glob("*.distcp")))
    if kind == "deepspeed":
        return len(list(_deepspeed_tag_dir(path).glob("*_optim_states.pt")))
    return None


def checkpoint_topology(path: str | os.PathLike) -> Topology:
    """What the writing run recorded (:data:`TOPOLOGY_KEY`), the world size counted from the shards
    when it recorded nothing."""
    path = Path(path)
    recorded = _client_state(path, checkpoint_format(path)).get(TOPOLOGY_KEY) or {}
    world = recorded.get("world_size") or checkpoint_world_size(path)
    return Topology(world, recorded.get("micro_batch_size"), recorded.get("accumulate_grad_batches"))


def _saved_shapes(path: Path, kind: str, client: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name (the GPT's own) -> shape, read from metadata only."""
    if kind == "file":
        raw = {k: tuple(v.shape) for k, v in client["state_dict"].items()}
    elif kind == "fsdp":
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        raw = {k[len("state_dict.") :]: tuple(m.size) for k, m in meta.items()
               if k.startswith("state_dict.") and hasattr(m, "size")}  # fmt: skip
    else:
        raw = {k: tuple(s) for group in client.get("param_shapes") or [] for k, s in group.items()}
    return {k: v for k, v in gpt_state_dict(raw).items()}  # type: ignore[arg-type]


def check_resume(path: str | os.PathLike, strategy_kind: str, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint this run cannot resume, before any process group starts.

    Args:
        path: the resume checkpoint (file or sharded folder).
        strategy_kind: the run's strategy kind (``auto``, ``ddp``, ``fsdp``, ``deepspeed``).
        model_shapes: the run's GPT tensor shapes, by the GPT's own names.

    Raises:
        ResumeError: a checkpoint of another strategy family (saying how to convert it or which
            strategy reads it), or of another model shape (naming the first tensor that differs).
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind not in FAMILIES:
        raise ResumeError(f"resume={path}: a {kind} folder is weights, not a training checkpoint: use init_from={path}")
    if strategy_kind not in FAMILIES[kind]:
        raise ResumeError(_family_message(path, kind, strategy_kind))
    saved = _saved_shapes(path, kind, _client_state(path, kind))
    for name, shape in model_shapes.items():
        if name in saved and saved[name] != tuple(shape):
            raise ResumeError(
                f"resume={path}: the checkpoint is of another model shape: {name} is {list(saved[name])} in the "
                f"checkpoint but {list(shape)} in this run's model. Resume with the checkpoint's model (its "
                "hyper_parameters.model), or start from other weights with init_from instead of resume"
            )
    missing = sorted(set(model_shapes) - set(saved) - {"lm_head.weight"})
    if saved and missing:
        raise ResumeError(
            f"resume={path}: the checkpoint has no {missing[0]} ({len(missing)} of this model's tensors are missing): "
            "it is of another model; resume with the checkpoint's model"
        )


def _family_message(path: Path, kind: str, strategy_kind: str) -> str:
    convert = f"python train/consolidate.py {path} --out <file.ckpt>"
    if kind == "deepspeed":
        return (
            f"resume={path} is a DeepSpeed checkpoint folder, which strategy={strategy_kind} cannot read: resume with "
            f"the DeepSpeed strategy that wrote it (strategy=deepspeed_stage_1|2|3[_offload], any number of ranks), or "
            f"convert it with `{convert}` and resume=<file.ckpt> (weights and progress kept, Adam moments restart)"
        )
    if kind == "fsdp":
        return (
            f"resume={path} is an FSDP (torch.distributed.checkpoint) folder, which strategy={strategy_kind} cannot "
            f"read: resume with strategy=fsdp (any number of ranks), or convert it with `{convert}` and "
            "resume=<file.ckpt> (full state with the optimizer: resumes exactly under ddp, fsdp or one device)"
        )
    return (
        f"resume={path} is a single-file checkpoint, which DeepSpeed cannot resume (it loads only its own folders): "
        f"resume with strategy=ddp or strategy=fsdp, or start DeepSpeed from its weights with init_from={path}"
    )


def universal_path(path: str | os.PathLike) -> Path:
    """Where :func:`deepspeed_universal` puts the universal form of the DeepSpeed folder ``path``."""
    path = Path(path)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def deepspeed_universal(path: str | os.PathLike, log: Any = print) -> Path:
    """The DeepSpeed universal checkpoint of the ZeRO folder ``path``: ``<path>.universal/``, converted
    with DeepSpeed's ``ds_to_universal`` when missing or stale, written under a temporary name and
    swapped in. The original folder is only read.

    The result is a DeepSpeed checkpoint root (``latest_universal`` + its tag folder holding
    ``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`` and the client state) that any world size loads
    with ``load_universal_checkpoint``. ``log`` receives one line with the conversion time.
    """
    path = Path(path)
    out = universal_path(path)
    tag_dir = _deepspeed_tag_dir(path)
    source = {"tag": tag_dir.name, "model_states_mtime_ns": _deepspeed_model_states(path).stat().st_mtime_ns}
    marker = out / "cgpt_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)
    args = types.SimpleNamespace(
        input_folder=str(tag_dir), output_folder=str(tmp / tag_dir.name), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports its progress on stdout
            ds_to_universal.main(args)
        marker_tmp = tmp / marker.name
        marker_tmp.write_text(json.dumps(source))
        swap_into_place(tmp, out)
    finally:
        remove_path(tmp)
    log(f"converted {path} to a DeepSpeed universal checkpoint {out} in {time.perf_counter() - start:.1f}s")
    return out
