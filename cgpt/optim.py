"""The Cerebras-GPT optimizer recipe: AdamW parameter groups and the warmup + decay schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

# Hidden weight matrices: under muP their learning rate is eta / m_w.
HIDDEN_MATRIX_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class OptimConfig:
    """AdamW settings.

    Fields:
        lr: peak learning rate (the muP base lr eta for muP models). ``None`` takes the preset's.
        weight_decay: decoupled decay (scaled by lr) on weight matrices and embeddings only.
        betas: AdamW betas.
        eps: AdamW epsilon; ``None`` takes the preset's (1e-8, or 1e-9 for 6.7B/13B).
        fused: use the fused AdamW kernel (CPU and CUDA); ``None`` picks it where available.
    """

    lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float | None = None
    fused: bool | None = None


@dataclass
class SchedulerConfig:
    """Linear warmup from 0 to the peak, then linear or cosine decay to ``final_lr_ratio * peak``.

    Fields:
        warmup_steps: warmup length; ``None`` takes the preset's.
        decay: ``linear`` or ``cosine``; ``None`` takes the preset's.
        final_lr_ratio: lr at ``max_steps`` as a fraction of the peak (Cerebras-GPT: 0.1).
    """

    warmup_steps: int | None = None
    decay: Literal["linear", "cosine"] | None = None
    final_lr_ratio: float = 0.1


def param_groups(model: nn.Module, weight_decay: float, width_mult: float = 1.0) -> list[dict[str, Any]]:
    """Split parameters into AdamW groups.

    Weight decay applies to weight matrices and embeddings (``ndim >= 2``), never to biases or
    LayerNorm parameters. Under muP (``width_mult > 1``) hidden matrices get ``lr_scale = 1/m_w``;
    embeddings (tied with the head), biases and LayerNorms keep the base lr.
    Each group carries ``lr_scale``, applied on top of the schedule.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    names: dict[tuple[bool, float], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = len(getattr(p, "ds_shape", p.shape)) >= 2  # DeepSpeed ZeRO-3 keeps the full shape in ds_shape
        scale = 1.0 / width_mult if name.endswith(HIDDEN_MATRIX_SUFFIXES) else 1.0
        key = (decay, scale)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    return [
        {
            "params": ps,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": scale,
            "names": names[(decay, scale)],
        }
        for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))
    ]


def build_optimizer(
    model: nn.Module, lr: float, config: OptimConfig, eps: float, width_mult: float = 1.0
) -> torch.optim.AdamW:
    groups = param_groups(model, config.weight_decay, width_mult)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
        g["initial_lr"] = g["lr"]
        g.pop("names")
    fused = config.fused
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(config.betas), eps=eps, fused=fused)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, decay: str, final_lr_ratio: float) -> float:
    """Fraction of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if step >= max_steps:
        return final_lr_ratio
    span = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    if decay == "linear":
        return 1.0 - (1.0 - final_lr_ratio) * progress
    if decay == "cosine":
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}: use 'linear' or 'cosine'")


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, decay: str, final_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(warmup_steps, warmup_steps, max_steps, decay, final_lr_ratio)  # validates ``decay``
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, max_steps, decay, final_lr_ratio)
    )
