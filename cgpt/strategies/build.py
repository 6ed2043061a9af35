"""Build the Lightning strategy a strategy config asks for (GPU or CPU/gloo variant)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import Strategy

from cgpt.config import ConfigError
from cgpt.strategies.registry import SPECS, StrategySpec, validate_strategy_config


def on_cpu(accelerator: str | None) -> bool:
    """Whether ``trainer.accelerator`` means CPU processes (explicitly, or ``auto`` without CUDA)."""
    return accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())


def build_strategy(
    config: dict[str, Any],
    accelerator: str | None = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    micro_batch_size: int = 1,
) -> Strategy | str:
    """A Lightning strategy (or strategy name) for ``config`` (a conf/strategy/*.yaml group).

    On a CPU accelerator FSDP/DeepSpeed come from :mod:`cgpt.strategies.cpu` (gloo).
    """
    config = validate_strategy_config(config)
    kind = config.pop("name")
    ac = bool(config.pop("activation_checkpointing", False))
    cpu = on_cpu(accelerator)
    if kind == "auto":
        if ac:
            raise ConfigError("strategy.activation_checkpointing needs strategy=ddp, fsdp or deepspeed_*")
        return "auto"
    if kind == "ddp":
        from cgpt.strategies.ddp import CgptDDPStrategy

        return CgptDDPStrategy(activation_checkpointing=ac, **config)
    if kind == "fsdp":
        if cpu:
            from cgpt.strategies.cpu import CPUFSDP2Strategy as fsdp_cls
        else:
            from cgpt.strategies.fsdp import FSDP2Strategy as fsdp_cls
        return fsdp_cls(devices_per_node=devices, num_nodes=num_nodes, activation_checkpointing=ac, **config)
    from cgpt.strategies.deepspeed import deepspeed_kwargs

    if cpu:
        from cgpt.strategies.cpu import CPUDeepSpeedStrategy as ds_cls
    else:
        from cgpt.strategies.deepspeed import CgptDeepSpeedStrategy as ds_cls
    # DeepSpeed wants the micro-batch for its config; the packed stream has no batch sampler to read it from.
    return ds_cls(logging_batch_size_per_gpu=micro_batch_size, activation_checkpointing=ac, **deepspeed_kwargs(config))


def strategy_spec_of(strategy: Strategy) -> StrategySpec:
    """The registry spec of a built Lightning strategy (single device and Lightning's own DDP: ``auto``)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        stage = strategy.config.get("zero_optimization", {}).get("stage", 2)
        offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer")
        return SPECS[f"deepspeed_stage_{stage}" + ("_offload" if offload and stage > 1 else "")]
    if isinstance(strategy, ModelParallelStrategy):
        return SPECS["fsdp"]
    return SPECS["auto"]


def holds_full_model(strategy: Strategy) -> bool:
    """Whether every rank of ``strategy`` holds the whole model, so rank 0 can run it alone (sampling, export)."""
    return strategy_spec_of(strategy).holds_full_model


def clips_in_optimizer_step(strategy: Strategy) -> bool:
    """True where the strategy clips gradients inside its own optimizer step (DeepSpeed)."""
    return strategy_spec_of(strategy).clips_in_optimizer_step


def clipped_grad_norm(strategy: Strategy) -> torch.Tensor | None:
    """The pre-clip gradient norm a strategy that clips inside its step computed last (else None)."""
    from cgpt.strategies.deepspeed import CgptDeepSpeedStrategy

    return strategy.last_grad_norm() if isinstance(strategy, CgptDeepSpeedStrategy) else None
