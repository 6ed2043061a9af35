"""Distributed strategies, built from one config dict: DDP, FSDP2 and DeepSpeed ZeRO 1/2/3.

Parallelism is applied here, from outside the model: ``cgpt/model.py`` stays plain PyTorch.

- ``ddp``: Lightning's DDP (NCCL on GPUs, gloo on CPUs).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each transformer :class:`Block`, then on
  the root (embeddings, final norm and the tied head), through Lightning's ModelParallelStrategy.
  ``sharding: hybrid`` shards within a node and replicates across nodes (HSDP).
- ``deepspeed``: Lightning's DeepSpeedStrategy with ZeRO stage 1/2/3, optional optimizer/parameter
  offload (the AdamW is swapped for DeepSpeedCPUAdam, which offload requires), bucket sizes, bf16.

``activation_checkpointing: true`` recomputes each Block's activations in the backward pass.
On a CPU accelerator the same configs run through the subclasses in :mod:`cgpt.strategies_cpu`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy
from torch import nn

from cgpt.config import ConfigError
from cgpt.model import Block

STRATEGY_NAMES = ("auto", "ddp", "fsdp", "deepspeed")
# Keys each strategy accepts (besides name and activation_checkpointing); documented in conf/strategy/*.yaml.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "auto": (),
    "ddp": ("find_unused_parameters", "gradient_as_bucket_view", "static_graph", "process_group_backend"),
    "fsdp": ("sharding", "reshard_after_forward", "mixed_precision", "sharded_checkpoint", "process_group_backend"),
    "deepspeed": (
        "stage", "offload_optimizer", "offload_parameters", "allgather_bucket_size", "reduce_bucket_size",
        "overlap_comm", "contiguous_gradients", "sub_group_size", "process_group_backend",
    ),
}  # fmt: skip


def _on_cpu(accelerator: str | None) -> bool:
    return accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())


def validate_strategy_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a strategy config for unknown names/keys and impossible combinations; return a copy."""
    config = dict(config or {"name": "auto"})
    name = config.get("name", "auto")
    if name not in STRATEGY_NAMES:
        raise ConfigError(f"strategy.name={name!r} is unknown; choose one of {', '.join(STRATEGY_NAMES)}")
    unknown = set(config) - {"name", "activation_checkpointing", *STRATEGY_KEYS[name]}
    if unknown:
        raise ConfigError(
            f"strategy {name!r} does not take {sorted(unknown)}; its keys are {sorted(STRATEGY_KEYS[name])} "
            "(offload_* needs strategy=deepspeed_stage_2_offload or deepspeed_stage_3_offload)"
        )
    if name == "deepspeed":
        stage = config.get("stage")
        if stage not in (1, 2, 3):
            raise ConfigError(f"strategy.stage={stage!r}: DeepSpeed ZeRO stage must be 1, 2 or 3")
        if config.get("offload_optimizer") and stage == 1:
            raise ConfigError("strategy.offload_optimizer needs ZeRO stage 2 or 3 (strategy=deepspeed_stage_2_offload)")
        if config.get("offload_parameters") and stage != 3:
            raise ConfigError("strategy.offload_parameters needs ZeRO stage 3 (strategy=deepspeed_stage_3_offload)")
    if name == "fsdp" and config.get("sharding", "full") not in ("full", "hybrid"):
        raise ConfigError(f"strategy.sharding={config.get('sharding')!r}: use 'full' or 'hybrid'")
    return config


def build_strategy(
    config: dict[str, Any],
    accelerator: str | None = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    micro_batch_size: int = 1,
) -> Strategy | str:
    """A Lightning strategy (or strategy name) for ``config`` (a conf/strategy/*.yaml group).

    On a CPU accelerator FSDP/DeepSpeed come from :mod:`cgpt.strategies_cpu` (gloo). Activation
    checkpointing is applied by :func:`apply_activation_checkpointing` at model setup; the returned
    strategy carries the switch as ``cgpt_activation_checkpointing``.
    """
    config = validate_strategy_config(config)
    name = config.pop("name")
    ac = bool(config.pop("activation_checkpointing", False))
    on_cpu = _on_cpu(accelerator)
    if name == "auto":
        if ac:
            raise ConfigError("strategy.activation_checkpointing needs strategy=ddp, fsdp or deepspeed_*")
        return "auto"
    if name == "ddp":
        strategy: Strategy = CgptDDPStrategy(**config)
    elif name == "fsdp":
        if on_cpu:
            from cgpt.strategies_cpu import CPUFSDP2Strategy as cls
        else:
            cls = FSDP2Strategy
        strategy = cls(devices_per_node=devices, num_nodes=num_nodes, **config)
    else:
        if on_cpu:
            from cgpt.strategies_cpu import CPUDeepSpeedStrategy as cls
        else:
            cls = CgptDeepSpeedStrategy
        # DeepSpeed wants the micro-batch for its config; the packed stream has no batch sampler to read it from.
        strategy = cls(logging_batch_size_per_gpu=micro_batch_size, **deepspeed_kwargs(config))
    strategy.cgpt_activation_checkpointing = ac
    return strategy


def deepspeed_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeedStrategy arguments from a ``deepspeed`` strategy config."""
    kwargs: dict[str, Any] = {
        "stage": config["stage"],
        "offload_optimizer": bool(config.get("offload_optimizer", False)),
        "offload_parameters": bool(config.get("offload_parameters", False)),
    }
    tuning = ("allgather_bucket_size", "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "sub_group_size")
    for key in tuning:
        if config.get(key) is not None:
            kwargs[key] = int(config[key]) if key.endswith("size") else config[key]
    if config.get("process_group_backend"):
        kwargs["process_group_backend"] = config["process_group_backend"]
    return kwargs


# --- activation checkpointing ------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each :class:`~cgpt.model.Block`'s activations during backward (non-reentrant).

    The block's ``forward`` is replaced on the instance, so no wrapper module appears and parameter
    names (hence checkpoints) are unchanged. Returns the number of blocks converted.
    """
    from torch.utils.checkpoint import checkpoint

    n = 0
    for module in model.modules():
        if isinstance(module, Block) and not getattr(module, "_cgpt_checkpointed", False):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
            module._cgpt_checkpointed = True
            n += 1
    return n


def _maybe_checkpoint(strategy: Strategy, pl_module: L.LightningModule) -> None:
    if getattr(strategy, "cgpt_activation_checkpointing", False) and getattr(pl_module, "model", None) is not None:
        apply_activation_checkpointing(pl_module.model)


# --- atomic directory checkpoints --------------------------------------------------------------
def _remove_checkpoint(strategy: Strategy, filepath: str | os.PathLike) -> None:
    """Rank 0 deletes a checkpoint, a file or a sharded folder."""
    if strategy.is_global_zero:
        path = Path(filepath)
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _atomic_dir_save(strategy: Strategy, filepath: str | os.PathLike, save: Any) -> None:
    """Run ``save(tmp_path)`` on every rank, then let rank 0 swap ``tmp_path`` into ``filepath``.

    A crash before the swap leaves the previous checkpoint untouched; the swap itself renames the
    old checkpoint aside, renames the new one in, then deletes the old one.
    """
    path = Path(strategy.broadcast(str(filepath)))
    tmp = path.with_name(f".{path.name}.tmp")
    if strategy.is_global_zero and tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    strategy.barrier("cgpt_ckpt_tmp")
    save(tmp)
    strategy.barrier("cgpt_ckpt_saved")
    if strategy.is_global_zero:
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    strategy.barrier("cgpt_ckpt_swapped")


# --- strategies --------------------------------------------------------------------------------
class CgptDDPStrategy(DDPStrategy):
    """DDP, plus per-Block activation checkpointing applied before wrapping."""

    strategy_name = "cgpt_ddp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        _maybe_checkpoint(self, self.lightning_module)
        return super()._setup_model(model)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2: ``fully_shard`` each transformer Block, then the root, over a 1-D mesh of all ranks
    (``sharding="full"``) or a (nodes, devices) mesh that replicates across nodes (``"hybrid"``).

    Checkpoints are sharded (torch.distributed.checkpoint folders) by default, written atomically.

    Args:
        devices_per_node / num_nodes: the mesh shape (the Trainer's ``devices`` and ``num_nodes``).
        sharding: ``full`` (ZeRO-3-like over all ranks) or ``hybrid`` (HSDP).
        reshard_after_forward: free unsharded parameters after forward (less memory, one more all-gather).
        mixed_precision: with a bf16 trainer precision, keep bf16 unsharded parameters and reduce
            gradients in fp32 (FSDP2 MixedPrecisionPolicy).
        sharded_checkpoint: one shard file per rank (else a full single file gathered on rank 0).
    """

    def __init__(
        self,
        devices_per_node: int = 1,
        num_nodes: int = 1,
        sharding: str = "full",
        reshard_after_forward: bool = True,
        mixed_precision: bool = True,
        sharded_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=num_nodes, tensor_parallel_size=devices_per_node,
            save_distributed_checkpoint=sharded_checkpoint, process_group_backend=process_group_backend,
        )  # fmt: skip
        self.sharding = sharding
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision = mixed_precision
        self.fsdp_mesh = None

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        kind = self.root_device.type
        if self.sharding == "hybrid":
            self.fsdp_mesh = init_device_mesh(
                kind, (self.num_nodes, self.num_processes), mesh_dim_names=("replicate", "shard")
            )
        else:
            self.fsdp_mesh = init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))

    def setup(self, trainer: L.Trainer) -> None:
        pl_module = self.lightning_module
        if pl_module.model is not None and not getattr(pl_module.model, "_cgpt_sharded", False):
            _maybe_checkpoint(self, pl_module)
            shard_gpt(pl_module.model, self.fsdp_mesh, self.reshard_after_forward, self._mp_policy())
        super().setup(trainer)

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(self.precision_plugin.precision)
        if self.mixed_precision and precision.startswith("bf16"):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save = super().save_checkpoint
        _atomic_dir_save(self, filepath, lambda tmp: save(checkpoint, tmp))

    def remove_checkpoint(self, filepath: Any) -> None:
        _remove_checkpoint(self, filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Also accept a single file without optimizer state (a consolidated DeepSpeed checkpoint):
        load the weights into the shards; the Adam moments start fresh."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_file():
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            if "optimizer_states" not in ckpt:
                from lightning.fabric.strategies.model_parallel import _load_raw_module_state

                _load_raw_module_state(ckpt.pop("state_dict"), self.model, strict=self.lightning_module.strict_loading)
                return ckpt
        return super().load_checkpoint(checkpoint_path, weights_only)


def shard_gpt(model: nn.Module, mesh: Any, reshard_after_forward: bool = True, mp_policy: Any = None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every :class:`Block`, then to ``model`` (embeddings, ln_f, tied head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away in backward: keep them gathered.
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    model._cgpt_sharded = True
    return model


class CgptDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed, plus: per-Block activation checkpointing, DeepSpeedCPUAdam when the
    optimizer is offloaded (DeepSpeed requires it), and atomic checkpoint folders."""

    strategy_name = "cgpt_deepspeed"

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Entered again by trainer.validate()/test() after fit: only a model built here is re-initialised.
        built_here = getattr(self.lightning_module, "model", None) is None
        with super().model_sharded_context():
            yield
        if self.zero_stage_3 and built_here:
            _reinit_partitioned(self.lightning_module)

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        _maybe_checkpoint(self, self.lightning_module)
        if optimizer is not None and self.config.get("zero_optimization", {}).get("offload_optimizer"):
            optimizer = _to_cpu_adam(optimizer, lr_scheduler)
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save = super().save_checkpoint
        _atomic_dir_save(self, filepath, lambda tmp: save(checkpoint, tmp))

    def remove_checkpoint(self, filepath: Any) -> None:
        _remove_checkpoint(self, filepath)


def _reinit_partitioned(pl_module: L.LightningModule) -> None:
    """Redo the model's init under ZeRO-3, as ``configure_model`` does it: GPT init, ``init_from``
    weights, then fresh LoRA adapters.

    ``deepspeed.zero.Init`` partitions each submodule's parameters as soon as it is built, so the
    init at the end of ``GPT.__init__`` saw empty shards. Gathering them and initialising on rank 0
    (which then broadcasts) from the generator state right after the build (the module's
    ``rng_after_build``: LoRA's adapters have drawn from the generator since) gives exactly the
    weights a single process builds from the same seed.
    """
    import deepspeed

    model = getattr(pl_module, "model", None)
    if model is None or not hasattr(model, "init_weights"):
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if pl_module.global_rank == 0:
            with torch.random.fork_rng(devices=devices):
                cpu_state, cuda_state = getattr(pl_module, "rng_after_build", None) or (None, None)
                if cpu_state is not None:
                    torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state)
                model.init_weights()
                if getattr(pl_module, "init_from", None):
                    from cgpt.init_from import load_weights

                    load_weights(model, pl_module.init_from)
                from cgpt.lora import has_lora, reset_adapters

                if has_lora(model):
                    reset_adapters(model)


def _to_cpu_adam(optimizer: torch.optim.Optimizer, lr_scheduler: Any = None) -> torch.optim.Optimizer:
    """The same AdamW (param groups, lr scales, betas, eps, decoupled weight decay) as DeepSpeedCPUAdam,
    with the lr scheduler re-pointed at it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(optimizer, torch.optim.AdamW):
        raise ConfigError(f"ZeRO offload converts AdamW to DeepSpeedCPUAdam; got {type(optimizer).__name__}")
    d = optimizer.defaults
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach", "capturable", "differentiable")}
              for g in optimizer.param_groups]  # fmt: skip
    cpu_adam = DeepSpeedCPUAdam(
        groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], adamw_mode=True
    )
    if lr_scheduler is not None:
        lr_scheduler.optimizer = cpu_adam
    return cpu_adam


# --- gradient clipping -------------------------------------------------------------------------
def strategy_clips_gradients(strategy: Strategy) -> bool:
    """True where the strategy clips inside its own optimizer step (DeepSpeed)."""
    return isinstance(strategy, DeepSpeedStrategy)


def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of ``max_norm``; returns the pre-clip norm.

    Correct for plain tensors (single device, DDP: gradients are already all-reduced) and for FSDP2's
    sharded DTensor gradients, whose local norms are reduced over the mesh before clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: a partial norm on each shard
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# --- consolidation -----------------------------------------------------------------------------
def checkpoint_format(path: str | os.PathLike) -> str:
    """``"file"`` (DDP / single device / FSDP full), ``"fsdp"`` (torch.distributed.checkpoint folder)
    or ``"deepspeed"`` (ZeRO folder); raises for anything else."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / ".metadata").is_file():
        return "fsdp"
    if (path / "latest").is_file():
        return "deepspeed"
    raise FileNotFoundError(f"{path}: not a cgpt checkpoint (a .ckpt file, an FSDP or a DeepSpeed checkpoint folder)")


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
    else:
        ckpt = _consolidate_deepspeed(path)
        optimizer = False
    from cgpt.checkpoint import COMPILE_PREFIX

    state = {}
    for k, v in ckpt["state_dict"].items():
        k = k.replace("_forward_module.", "", 1) if k.startswith("_forward_module.") else k
        state[k.replace(COMPILE_PREFIX, "")] = v.float() if v.is_floating_point() else v
    ckpt["state_dict"] = state
    for sched in ckpt.get("lr_schedulers", []):
        # The schedule is a function of the step: keep the step count, take base lrs from the new optimizer.
        for key in ("base_lrs", "_last_lr"):
            sched.pop(key, None)
    ckpt["cgpt_consolidated"] = {"source": kind, "optimizer": optimizer}
    return ckpt


def _consolidate_dcp(path: Path) -> dict[str, Any]:
    """An FSDP2 sharded folder (DCP shards + meta.pt) -> a Lightning checkpoint with full tensors and
    the optimizer state re-keyed by parameter index, as ``torch.optim`` saves it."""
    import tempfile

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
