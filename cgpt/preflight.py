"""Checks that run before any process group starts: impossible settings fail here, with the fix."""

from __future__ import annotations

from dataclasses import dataclass

from cgpt.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits over devices and gradient accumulation."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    accumulate_grad_batches: int


def plan_batch(global_batch_size: int, micro_batch_size: int, devices: int, num_nodes: int = 1) -> BatchPlan:
    """Split ``global_batch_size`` into micro-batches x devices x nodes x accumulation steps."""
    for key, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                       ("devices", devices), ("num_nodes", num_nodes)):  # fmt: skip
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    world = devices * num_nodes
    per_pass = micro_batch_size * world
    if global_batch_size % per_pass:
        divisors = [m for m in range(1, global_batch_size + 1) if global_batch_size % (m * world) == 0]
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} is not divisible by data.micro_batch_size="
            f"{micro_batch_size} x trainer.devices={devices} x trainer.num_nodes={num_nodes} = {per_pass}. "
            f"Micro-batch sizes that fit this world size: {divisors[-6:] or 'none'}; "
            "or change data.global_batch_size."
        )
    return BatchPlan(global_batch_size, micro_batch_size, world, global_batch_size // per_pass)
