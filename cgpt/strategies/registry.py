"""The strategy registry: what each ``conf/strategy/<name>.yaml`` is, in one table.

Building (:mod:`cgpt.strategies.build`), preflight (:mod:`cgpt.preflight`), the memory estimate
(:mod:`cgpt.memory`), the planner and ``train/plan.py`` all read these specs; none of them keeps its
own list of strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cgpt.config import ConfigError

KINDS = ("auto", "ddp", "fsdp", "deepspeed")
# Keys each kind accepts (besides name and activation_checkpointing); documented in conf/strategy/*.yaml.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "auto": (),
    "ddp": ("find_unused_parameters", "gradient_as_bucket_view", "static_graph", "process_group_backend"),
    "fsdp": ("sharding", "reshard_after_forward", "mixed_precision", "sharded_checkpoint", "process_group_backend"),
    "deepspeed": (
        "stage", "offload_optimizer", "offload_parameters", "allgather_bucket_size", "reduce_bucket_size",
        "overlap_comm", "contiguous_gradients", "sub_group_size", "process_group_backend",
    ),
}  # fmt: skip
ALL_PRECISIONS = None  # every precision the device supports


@dataclass(frozen=True)
class StrategySpec:
    """One strategy as a user picks it (``strategy=<name>``).

    Fields:
        name: the config group option, ``conf/strategy/<name>.yaml``.
        kind: the implementation: ``auto`` (Lightning's single-device or DDP), ``ddp``, ``fsdp``
            (FSDP2) or ``deepspeed``.
        stage: DeepSpeed's ZeRO stage (None for the others).
        shards: which training state is split across ranks: any of ``optimizer``, ``gradients``,
            ``parameters`` (what the memory estimate divides by the world size).
        offload: which state lives in host memory instead: ``optimizer``, ``parameters``.
        precisions: the trainer precisions the strategy trains in (None: any the device has).
        summary: one line for tables and ``--help``.
    """

    name: str
    kind: str
    stage: int | None = None
    shards: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    precisions: tuple[str, ...] | None = ALL_PRECISIONS
    summary: str = ""

    @property
    def holds_full_model(self) -> bool:
        """Every rank holds all parameters (so rank 0 alone can run the model, e.g. to sample)."""
        return "parameters" not in self.shards

    @property
    def clips_in_optimizer_step(self) -> bool:
        """The strategy clips gradients inside its own optimizer step (DeepSpeed)."""
        return self.kind == "deepspeed"

    def config(self) -> dict[str, Any]:
        """The keys that identify this spec in a strategy config dict (what its YAML sets)."""
        out: dict[str, Any] = {"name": self.kind}
        if self.kind == "deepspeed":
            out["stage"] = self.stage
            out["offload_optimizer"] = "optimizer" in self.offload
            if self.stage == 3:
                out["offload_parameters"] = "parameters" in self.offload
        return out


_ZERO = {1: ("optimizer",), 2: ("optimizer", "gradients"), 3: ("optimizer", "gradients", "parameters")}
SPECS: dict[str, StrategySpec] = {
    s.name: s
    for s in (
        StrategySpec("auto", "auto", summary="Lightning's choice: one device, or DDP over several"),
        StrategySpec("ddp", "ddp", summary="data parallel: every rank holds everything"),
        StrategySpec("fsdp", "fsdp", shards=_ZERO[3], precisions=("32-true", "bf16-mixed", "bf16-true", "16-true"),
                     summary="FSDP2: parameters, gradients and optimizer state sharded per block"),
        StrategySpec("deepspeed_stage_1", "deepspeed", 1, _ZERO[1], summary="ZeRO-1: optimizer state sharded"),
        StrategySpec("deepspeed_stage_2", "deepspeed", 2, _ZERO[2],
                     summary="ZeRO-2: optimizer state and gradients sharded"),
        StrategySpec("deepspeed_stage_2_offload", "deepspeed", 2, _ZERO[2], ("optimizer",),
                     summary="ZeRO-2 with the optimizer state in host memory (DeepSpeedCPUAdam)"),
        StrategySpec("deepspeed_stage_3", "deepspeed", 3, _ZERO[3], summary="ZeRO-3: everything sharded"),
        StrategySpec("deepspeed_stage_3_offload", "deepspeed", 3, _ZERO[3], ("optimizer", "parameters"),
                     summary="ZeRO-3 with optimizer state and parameters in host memory"),
    )
}  # fmt: skip


def validate_strategy_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Check a strategy config for unknown names/keys and impossible combinations; return a copy."""
    config = dict(config or {"name": "auto"})
    kind = config.get("name", "auto")
    if kind not in KINDS:
        raise ConfigError(
            f"strategy.name={kind!r} is unknown; choose one of {', '.join(KINDS)} "
            f"(or a preset: strategy={'|'.join(SPECS)})"
        )
    for key in ("offload_optimizer", "offload_parameters", "offload"):
        if config.get(key) and kind != "deepspeed":
            raise ConfigError(
                f"strategy.{key} is only available with DeepSpeed: use strategy=deepspeed_stage_2_offload "
                f"or deepspeed_stage_3_offload (got strategy.name={kind!r})"
            )
    unknown = set(config) - {"name", "activation_checkpointing", *KIND_KEYS[kind]}
    if unknown:
        raise ConfigError(
            f"strategy {kind!r} does not take {sorted(unknown)}; its keys are {sorted(KIND_KEYS[kind])} "
            "(offload_* needs strategy=deepspeed_stage_2_offload or deepspeed_stage_3_offload)"
        )
    if kind == "deepspeed":
        stage = config.get("stage")
        if stage not in (1, 2, 3):
            raise ConfigError(f"strategy.stage={stage!r}: DeepSpeed ZeRO stage must be 1, 2 or 3")
        if config.get("offload_optimizer") and stage == 1:
            raise ConfigError("strategy.offload_optimizer needs ZeRO stage 2 or 3 (strategy=deepspeed_stage_2_offload)")
        if config.get("offload_parameters") and stage != 3:
            raise ConfigError("strategy.offload_parameters needs ZeRO stage 3 (strategy=deepspeed_stage_3_offload)")
    if kind == "fsdp" and config.get("sharding", "full") not in ("full", "hybrid"):
        raise ConfigError(f"strategy.sharding={config.get('sharding')!r}: use 'full' or 'hybrid'")
    return config


def spec_for(config: dict[str, Any] | None) -> StrategySpec:
    """The spec a (validated) strategy config dict describes; offload flags set by hand pick the
    matching offload spec (ZeRO-3 with only the optimizer offloaded counts as the offload spec)."""
    config = validate_strategy_config(config)
    kind = config["name"]
    if kind != "deepspeed":
        return SPECS[kind]
    name = f"deepspeed_stage_{config['stage']}"
    if config.get("offload_optimizer") or config.get("offload_parameters"):
        name += "_offload"
    return SPECS[name]


def offloaded(config: dict[str, Any]) -> tuple[str, ...]:
    """What a strategy config actually keeps in host memory (its flags, which may differ from the preset's)."""
    return tuple(k for k in ("optimizer", "parameters") if config.get(f"offload_{k}"))
