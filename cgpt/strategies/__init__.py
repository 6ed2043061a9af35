"""Distributed strategies: they wrap the model and nothing else.

Parallelism is applied here, from outside the model (``cgpt/model.py`` stays plain PyTorch):

- :mod:`~cgpt.strategies.registry`: what each ``strategy=<name>`` is (sharding, offload,
  precisions); read by building, preflight, the memory estimate and the planner.
- :mod:`~cgpt.strategies.build`: the Lightning strategy for a config.
- :mod:`~cgpt.strategies.ddp`, :mod:`~cgpt.strategies.fsdp` (FSDP2 ``fully_shard`` per block, HSDP),
  :mod:`~cgpt.strategies.deepspeed` (ZeRO 1/2/3, offload), :mod:`~cgpt.strategies.cpu` (their gloo
  variants for CPU processes), plus activation checkpointing, clipping and atomic checkpoint folders.

Checkpoint formats and loading weights back are :mod:`cgpt.weights`'s: nothing here reads them.
"""

from cgpt.strategies.activation_checkpointing import apply_activation_checkpointing
from cgpt.strategies.build import (
    build_strategy,
    clipped_grad_norm,
    clips_in_optimizer_step,
    holds_full_model,
    on_cpu,
    strategy_spec_of,
)
from cgpt.strategies.clipping import clip_grad_norm, grad_norm
from cgpt.strategies.ddp import average_ddp_gradients
from cgpt.strategies.registry import KINDS, SPECS, StrategySpec, spec_for, validate_strategy_config

__all__ = [
    "KINDS",
    "SPECS",
    "StrategySpec",
    "apply_activation_checkpointing",
    "average_ddp_gradients",
    "build_strategy",
    "clip_grad_norm",
    "clipped_grad_norm",
    "clips_in_optimizer_step",
    "grad_norm",
    "holds_full_model",
    "on_cpu",
    "spec_for",
    "strategy_spec_of",
    "validate_strategy_config",
]
