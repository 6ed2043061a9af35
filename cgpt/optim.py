"""The Cerebras-GPT optimizer recipe: AdamW parameter groups and the warmup + decay schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cgpt.config import ConfigError, TrainingDefaults

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

    The schedule is a function of the *schedule position*, the optimizer step plus ``step_offset``.

    Fields:
        warmup_steps: warmup length; ``None`` takes the preset's.
        decay: ``linear`` or ``cosine``; ``None`` takes the preset's.
        final_lr_ratio: lr at the end of the decay as a fraction of the peak (Cerebras-GPT: 0.1).
        decay_steps: length of the decay after warmup; the lr stays at the final value after it.
            ``None``: the preset's (the 13B's phase-1 cosine is 174,081 steps), else to the end of
            the run (``max_steps + step_offset - warmup``).
        step_offset: added to the optimizer step to give the schedule position. A resume that
            changes the global batch re-bases the schedule with it (the 13B's phase 2: -19,000, so
            the phase-1 checkpoint's step 57,000 is position 38,000 at batch 1080).
    """

    warmup_steps: int | None = None
    decay: Literal["linear", "cosine"] | None = None
    final_lr_ratio: float = 0.1
    decay_steps: int | None = None
    step_offset: int = 0

    def __post_init__(self) -> None:
        if self.decay_steps is not None and (isinstance(self.decay_steps, bool) or self.decay_steps <= 0):
            raise ConfigError(f"scheduler.decay_steps must be a positive step count or null, got {self.decay_steps!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps must be >= 0 or null, got {self.warmup_steps!r}")


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: every value a run's lr depends on, besides the peak."""

    warmup_steps: int
    decay: str
    decay_steps: int
    final_lr_ratio: float
    step_offset: int
    max_steps: int

    def multiplier(self, step: int) -> float:
        """Fraction of the peak lr at optimizer step ``step`` of this run."""
        return lr_multiplier(
            step + self.step_offset, self.warmup_steps, 0, self.decay, self.final_lr_ratio, self.decay_steps
        )


def resolve_schedule(config: SchedulerConfig, recipe: TrainingDefaults, max_steps: int) -> Schedule:
    """Fill the unset values of ``config`` from the preset's ``recipe`` for a run of ``max_steps``.

    An unset warmup keeps the preset's warmup *fraction* of its published step count, so a
    shortened run still warms up over the same share of training. An unset ``decay_steps`` is the
    preset's, scaled with the run length the same way (the 13B at its published 57,000 steps:
    174,081), or else reaches the run's last step.
    """
    decay = config.decay or recipe.decay
    warmup = config.warmup_steps
    if warmup is None:
        warmup = math.ceil(max_steps * recipe.warmup_steps / recipe.max_steps)
    if warmup >= max_steps + config.step_offset:
        raise ConfigError(f"scheduler.warmup_steps={warmup} must be below trainer.max_steps={max_steps}")
    if config.decay_steps is not None:
        decay_steps = config.decay_steps
    elif recipe.decay_steps is not None:
        decay_steps = max(1, round(max_steps * recipe.decay_steps / recipe.max_steps))
    else:
        decay_steps = max(1, max_steps + config.step_offset - warmup)
    lr_multiplier(warmup, warmup, max_steps, decay, config.final_lr_ratio)  # validates ``decay``
    return Schedule(warmup, decay, decay_steps, config.final_lr_ratio, config.step_offset, max_steps)


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


def lr_multiplier(
    step: int, warmup_steps: int, max_steps: int, decay: str, final_lr_ratio: float, decay_steps: int | None = None
) -> float:
    """Fraction of the peak lr at schedule position ``step`` (0-based).

    Warmup ``step / warmup_steps``, then ``decay`` over ``decay_steps`` (``None``: ``max_steps -
    warmup_steps``) to ``final_lr_ratio``, held after that. These are ModelZoo's ``LinearLR`` and
    ``CosineDecayLR`` (Keras ``CosineDecay``, step clipped at ``total_iters``) in sequence.
    """
    step = max(step, 0)  # a re-based schedule before its resume point (see lit_module's check)
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = decay_steps if decay_steps is not None else max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return 1.0 - (1.0 - final_lr_ratio) * progress
    if decay == "cosine":
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}: use 'linear' or 'cosine'")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    decay: str,
    final_lr_ratio: float,
    decay_steps: int | None = None,
    step_offset: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over optimizer steps: :func:`lr_multiplier` at position ``step + step_offset``.

    ``max_steps`` is the run's last optimizer step; with ``decay_steps=None`` the decay ends there.
    """
    lr_multiplier(warmup_steps, warmup_steps, max_steps, decay, final_lr_ratio)  # validates ``decay``
    end = max_steps + step_offset
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step + step_offset, warmup_steps, end, decay, final_lr_ratio, decay_steps),
    )
