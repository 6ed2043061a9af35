"""One way in for weights: whatever a user points at becomes ``(ModelConfig, state_dict)`` or a GPT."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cgpt.config import ModelConfig
from cgpt.model import GPT
from cgpt.weights.atomic import atomic_save
from cgpt.weights.formats import read_checkpoint, resolve_checkpoint
from cgpt.weights.state import gpt_state_dict, load_strict


def _checkpoint_config(ckpt: dict[str, Any], path: Path) -> ModelConfig:
    model = ckpt.get("hyper_parameters", {}).get("model")
    if not model:
        raise ValueError(f"{path}: not a cgpt checkpoint (no hyper_parameters.model)")
    return ModelConfig.from_dict(dict(model))


def source_model_config(source: str | os.PathLike) -> ModelConfig:
    """The architecture of a weights source, without loading its weights (files are memory-mapped)."""
    kind, path = resolve_checkpoint(source)
    if kind == "hf":
        from cgpt.hf import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()), path / "config.json")
    return _checkpoint_config(read_checkpoint(path), path)


def load_source(source: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(architecture, GPT state dict)`` of any weights source.

    A source is a Hugging Face GPT-2 folder, a cgpt ``.ckpt`` file, an FSDP or DeepSpeed checkpoint
    folder (consolidated in memory) or a run folder (its resume checkpoint). State dicts use the
    GPT's own names (wrapper and compile prefixes removed, the tied head filled in); a checkpoint
    trained with LoRA arrives with its adapters merged into the weights.
    """
    kind, path = resolve_checkpoint(source)
    if kind == "hf":
        from cgpt.hf import from_hf

        model = from_hf(path)
        return model.config, model.state_dict()
    ckpt = read_checkpoint(path)
    config = _checkpoint_config(ckpt, path)
    state = gpt_state_dict(ckpt["state_dict"])
    lora = ckpt.get("hyper_parameters", {}).get("lora")
    if lora and any(".lora_" in k for k in state):
        from cgpt.lora import LoRAConfig, apply_lora, merge_lora

        model = GPT(config)
        apply_lora(model, LoRAConfig.from_dict(lora))
        load_strict(model, state, path)
        state = merge_lora(model).state_dict()
    return config, state


def load_gpt(source: str | os.PathLike) -> GPT:
    """A :class:`~cgpt.model.GPT` (train mode, on the CPU) with the weights of any source (see :func:`load_source`)."""
    config, state = load_source(source)
    model = GPT(config)
    load_strict(model, state, source)
    return model


def load_into(model: torch.nn.Module, source: str | os.PathLike, label: str | None = None) -> None:
    """Load a source's weights into an existing ``model`` strictly; LoRA adapters already on ``model``
    are kept (a source trained with LoRA arrives merged). ``label`` names the source in errors."""
    load_strict(model, load_source(source)[1], label or source, skip_adapters=True)


def save_gpt_checkpoint(model: GPT, path: str | os.PathLike) -> Path:
    """Write ``model`` as a weights-only checkpoint of :class:`~cgpt.lit_module.CerebrasGPTModule`.

    It holds the weights under ``state_dict`` (``model.`` prefix) and the module's hyper-parameters,
    so :func:`load_gpt` and ``CerebrasGPTModule.load_from_checkpoint`` both rebuild the model. It has
    no optimizer state or step counters: a starting point (``init_from``), not a resume point.
    """
    import lightning

    checkpoint = {
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict(), "optim": None, "scheduler": None, "compile": False},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    return atomic_save(checkpoint, path)
