"""Checks that run before any process group starts: impossible settings fail here, with the fix."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cgpt.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from cgpt.memory import MemoryEstimate


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits over devices and gradient accumulation."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    accumulate_grad_batches: int


def world_sizes(global_batch_size: int, micro_batch_size: int) -> list[int]:
    """Data-parallel world sizes that split ``global_batch_size`` into whole micro-batches."""
    if global_batch_size % micro_batch_size:
        return []
    steps = global_batch_size // micro_batch_size
    return [w for w in range(1, steps + 1) if steps % w == 0]


def plan_batch(global_batch_size: int, micro_batch_size: int, devices: int, num_nodes: int = 1) -> BatchPlan:
    """Split ``global_batch_size`` into micro-batches x devices x nodes x accumulation steps.

    The global batch is the run's (the preset's unless ``data.global_batch_size`` says otherwise)
    whatever the world size: a resume on more or fewer devices recomputes the accumulation, and
    keeps the data order (cgpt/data/stream.py). A world size that cannot split it is refused here,
    before any process starts, with the device counts that work."""
    for key, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                       ("devices", devices), ("num_nodes", num_nodes)):  # fmt: skip
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    world = devices * num_nodes
    per_pass = micro_batch_size * world
    if global_batch_size % per_pass:
        divisors = [m for m in range(1, global_batch_size + 1) if global_batch_size % (m * world) == 0]
        per_node = [w // num_nodes for w in world_sizes(global_batch_size, micro_batch_size) if w % num_nodes == 0]
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} is not divisible by data.micro_batch_size="
            f"{micro_batch_size} x trainer.devices={devices} x trainer.num_nodes={num_nodes} = {per_pass}. "
            f"Device counts that work with this micro-batch: trainer.devices in "
            f"{per_node or 'none (the micro-batch does not divide the global batch)'}"
            + (f" (with trainer.num_nodes={num_nodes})" if num_nodes > 1 else "")
            + f", i.e. world sizes {world_sizes(global_batch_size, micro_batch_size)}; micro-batch sizes that fit "
            f"this world size: {divisors[-6:] or 'none'}; or change data.global_batch_size (which changes the "
            "run's data order and optimization)."
        )
    return BatchPlan(global_batch_size, micro_batch_size, world, global_batch_size // per_pass)


def check_torchrun(devices: object, num_nodes: object, environ: Mapping[str, str] | None = None) -> None:
    """Under ``torchrun`` (or any torch elastic agent): refuse a trainer layout that does not match the
    processes it started, before Lightning waits for ranks that will never come.

    Does nothing outside torchrun (no ``TORCHELASTIC_RUN_ID``).
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env or "WORLD_SIZE" not in env:
        return
    per_node, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
    if devices != per_node or not isinstance(num_nodes, int) or num_nodes * per_node != world:
        raise ConfigError(
            f"torchrun started {world} processes ({per_node} per node, {world // per_node} node(s)) but "
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes}: set trainer.devices to torchrun's "
            "--nproc-per-node and trainer.num_nodes to its --nnodes"
        )


def check_run(
    model_config: ModelConfig,
    strategy: dict[str, Any],
    trainer: dict[str, Any],
    plan: BatchPlan,
    seq_len: int,
    memory_limit_bytes: float | None = None,
    verbose: bool = True,
) -> MemoryEstimate:
    """Reject strategy/precision/memory settings that cannot work, before any process group starts.

    Checks the strategy config (names, keys, offload only with DeepSpeed), that DeepSpeed is installed
    when chosen, that the precision exists on the accelerator and suits the strategy, and that the
    estimated per-device memory fits (printed when ``verbose``). Returns the estimate.
    """
    from cgpt.hardware import resolve_precision
    from cgpt.memory import GIB, device_memory_bytes, estimate_memory
    from cgpt.strategies import spec_for, validate_strategy_config

    strategy = validate_strategy_config(strategy)
    spec = spec_for(strategy)
    accelerator = trainer.get("accelerator", "auto")
    precision = resolve_precision(trainer.get("precision"), accelerator)
    if spec.precisions is not None and precision not in spec.precisions:
        raise ConfigError(
            f"strategy={spec.name} supports trainer.precision {', '.join(spec.precisions)}; got {precision}"
        )
    if spec.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy=deepspeed_* needs DeepSpeed: pip install 'cgpt[deepspeed]'")
    world = plan.world_size
    if spec.kind == "fsdp" and strategy.get("sharding") == "hybrid" and trainer.get("num_nodes", 1) < 2:
        raise ConfigError("strategy.sharding=hybrid replicates across nodes: it needs trainer.num_nodes >= 2")
    estimate = estimate_memory(
        model_config, strategy, precision, plan.micro_batch_size, seq_len,
        devices=trainer.get("devices", 1), num_nodes=trainer.get("num_nodes", 1),
    )  # fmt: skip
    if verbose and int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0:
        print(f"preflight: {estimate.format()} (world size {world})", flush=True)
    limit = memory_limit_bytes or device_memory_bytes(accelerator, trainer.get("devices", 1))
    if limit and estimate.device_total > 0.95 * limit:
        raise ConfigError(
            f"the model will not fit: about {estimate.device_total / GIB:.1f} GiB per device needed, "
            f"{limit / GIB:.1f} GiB available ({estimate.format()}). Shard it (strategy=fsdp or "
            "deepspeed_stage_3, or *_offload), set strategy.activation_checkpointing=true, lower "
            "data.micro_batch_size (accumulation keeps the global batch) or add devices."
        )
    return estimate
