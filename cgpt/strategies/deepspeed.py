"""DeepSpeed ZeRO 1/2/3 through Lightning's DeepSpeedStrategy, with optional optimizer/parameter offload."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from cgpt.config import ConfigError
from cgpt.strategies.activation_checkpointing import apply_activation_checkpointing
from cgpt.strategies.checkpoint_io import atomic_dir_save, remove_checkpoint
from cgpt.weights.reshard import checkpoint_world_size, deepspeed_universal, universal_path

TUNING_KEYS = ("allgather_bucket_size", "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "sub_group_size")


def deepspeed_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeedStrategy arguments from a ``deepspeed`` strategy config."""
    kwargs: dict[str, Any] = {
        "stage": config["stage"],
        "offload_optimizer": bool(config.get("offload_optimizer", False)),
        "offload_parameters": bool(config.get("offload_parameters", False)),
    }
    for key in TUNING_KEYS:
        if config.get(key) is not None:
            kwargs[key] = int(config[key]) if key.endswith("size") else config[key]
    if config.get("process_group_backend"):
        kwargs["process_group_backend"] = config["process_group_backend"]
    return kwargs


class CgptDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed, plus: per-Block activation checkpointing, DeepSpeedCPUAdam when the
    optimizer is offloaded (DeepSpeed requires it), atomic checkpoint folders, and the ZeRO-3
    re-initialisation of a model built on empty partitions.

    Under ZeRO-3, ``deepspeed.zero.Init`` partitions each submodule's parameters as soon as it is
    built, so the model's own initialisation saw empty shards. After the build, the strategy gathers
    the parameters and asks the LightningModule to initialise them again on rank 0 (which then
    broadcasts), through the module's ``reinitialize_weights()`` hook: the module owns what its
    initialisation is (GPT init, ``init_from`` weights, LoRA adapters).
    """

    strategy_name = "cgpt_deepspeed"

    def __init__(self, *args: Any, activation_checkpointing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.activation_checkpointing = activation_checkpointing

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Entered again by trainer.validate()/test() after fit: only a model built here is re-initialised.
        built_here = getattr(self.lightning_module, "model", None) is None
        with super().model_sharded_context():
            yield
        if self.zero_stage_3 and built_here:
            self._reinitialize_partitioned()

    def _reinitialize_partitioned(self) -> None:
        import deepspeed

        module = self.lightning_module
        hook = getattr(module, "reinitialize_weights", None)
        model = getattr(module, "model", None)
        if hook is None or model is None:
            return
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if self.global_rank == 0:
                hook()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if self.activation_checkpointing and getattr(self.lightning_module, "model", None) is not None:
            apply_activation_checkpointing(self.lightning_module.model)
        if optimizer is not None and self.config.get("zero_optimization", {}).get("offload_optimizer"):
            optimizer = _to_cpu_adam(optimizer, lr_scheduler)
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning's closure has already divided the loss by accumulate_grad_batches (as for DDP/FSDP);
        # DeepSpeed's engine.backward would divide it by gradient_accumulation_steps once more, leaving
        # gradients 1/accumulation too small, so clipping (and with it Adam's updates) acted differently.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def last_grad_norm(self) -> torch.Tensor | None:
        """The pre-clip global gradient norm of the last optimizer step (known after ``engine.step()``)."""
        norm = self.deepspeed_engine.get_global_grad_norm() if self.model is not None else None
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32).detach()

    def set_step_gate(self, gate: Callable[[torch.Tensor | None], bool]) -> bool:
        """Call ``gate(pre-clip global norm)`` inside every ZeRO optimizer step, after the norm and
        before the update; when it returns True the step is dropped through DeepSpeed's own overflow
        path (gradients and reduction buffers cleared, weights and optimizer state untouched).

        ZeRO 1/2 (``scaled_global_norm``) and ZeRO 3 (``_get_norm_groups``) compute the norm, then
        both call ``_update_scale(overflow)`` before the update or the overflow clean-up: the gate
        sits in that call, so it runs once per step on every rank (it may be a collective).

        Returns False (nothing installed) under fp16: dynamic loss scaling overflows, and skips, by
        design, so those skips are not faults.
        """
        optimizer = self.deepspeed_engine.optimizer
        if getattr(optimizer, "dtype", None) == torch.float16:
            return False
        if hasattr(optimizer, "_cgpt_step_gate"):  # installed by an earlier fit: only the gate changes
            optimizer._cgpt_step_gate[0] = gate
            return True
        gates = optimizer._cgpt_step_gate = [gate]
        stage3 = hasattr(optimizer, "_get_norm_groups")
        norm_name = "_get_norm_groups" if stage3 else "scaled_global_norm"
        if not (hasattr(optimizer, norm_name) and hasattr(optimizer, "_update_scale")):
            raise ConfigError(
                f"the step guard needs DeepSpeed's ZeRO optimizer (stage 1, 2 or 3); got {type(optimizer).__name__}: "
                "set guard=off or use a ZeRO stage"
            )
        original_norm, original_update = getattr(optimizer, norm_name), optimizer._update_scale
        seen: dict[str, Any] = {}

        def norm_hook(*args: Any, **kwargs: Any) -> Any:
            seen["norm"] = out = original_norm(*args, **kwargs)
            return out

        def update_hook(has_overflow: bool = False) -> Any:
            norm = seen.pop("norm", None)
            if has_overflow or norm is None:
                total = torch.tensor(float("inf"))  # DeepSpeed found the gradients non-finite itself
            else:
                # ZeRO-3 gives one norm per group; DeepSpeed's norm helpers report a non-finite norm as -1
                groups = torch.stack([torch.as_tensor(n).float().reshape(()) for n in (norm if stage3 else [norm])])
                total = torch.where((groups < 0).any(), float("nan"), torch.linalg.vector_norm(groups))
                total = total / optimizer.loss_scale
            if gates[0](total):
                optimizer.overflow = has_overflow = True
            return original_update(has_overflow)

        setattr(optimizer, norm_name, norm_hook)
        optimizer._update_scale = update_hook
        return True

    # --- recomputing a step (guard.action=rollback) ---------------------------------------------
    def engine_forward(self, method: str, *args: Any) -> Any:
        """``lightning_module.<method>(*args)`` run as the engine's forward, as Lightning runs
        ``training_step``: ZeRO-3 gathers the partitioned parameters around it and the engine
        registers its backward hooks on the output."""
        return self._forward_redirection(self.model, self.lightning_module, method, *args)

    def recompute_step(self, batches: list[Any], method: str = "_loss") -> torch.Tensor:
        """Forward and backward of an optimizer step's micro-batches again through the engine (after
        the gate dropped the step: DeepSpeed's overflow path has cleared its gradients and reduction
        buffers), with the accumulation boundary on the last one so ZeRO reduces and partitions as in
        the step. Returns this rank's mean loss; :meth:`step_recomputed` then takes the step.

        Each loss is ``lightning_module.<method>(batch)``, not ``training_step``: a recomputation logs
        nothing and keeps no micro-batch, and a fault injected in ``training_step`` (a transient one)
        is not in it, as under DDP."""
        engine = self.deepspeed_engine
        scale = self.lightning_module.trainer.accumulate_grad_batches  # as Lightning's closure divides
        total = torch.zeros((), device=self.root_device)
        for i, batch in enumerate(batches):
            engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            with self.precision_plugin.train_step_context():
                loss = self.engine_forward(method, batch) / scale
            engine.backward(loss, scale_wrt_gas=False)
            total = total + loss.detach().float()
        return total

    def step_recomputed(self) -> None:
        """The engine's step of a recomputed optimizer step (the gate judges it inside). The engine
        counted the step once already, when its first computation was dropped: its step, sample and
        micro-step counters end as they were, and that drop is not counted as a skipped step."""
        engine = self.deepspeed_engine
        counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps")}
        engine.skipped_steps -= 1
        try:
            engine.step()
        finally:
            for key, value in counters.items():
                setattr(engine, key, value)
            engine.set_gradient_accumulation_boundary(None)  # back to counting micro-steps

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save = super().save_checkpoint
        atomic_dir_save(self, filepath, lambda tmp: save(checkpoint, tmp))
        remove_checkpoint(self, universal_path(filepath))  # a conversion of the folder this save replaced

    def remove_checkpoint(self, filepath: Any) -> None:
        remove_checkpoint(self, filepath)
        remove_checkpoint(self, universal_path(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume a ZeRO folder written by any number of ranks. At another world size, rank 0 converts
        it to DeepSpeed's universal checkpoint (next to it; the original is only read) and every rank
        loads its own partition of the fp32 weights, Adam moments and step from that."""
        path = Path(self.broadcast(str(checkpoint_path)))
        written_by = checkpoint_world_size(path) if path.is_dir() else None
        if written_by in (None, self.world_size):
            return super().load_checkpoint(path, weights_only)
        universal = deepspeed_universal(path, log=_say) if self.is_global_zero else None
        universal = Path(self.broadcast(str(universal)))
        config = self.deepspeed_engine._config
        config.load_universal_checkpoint = True  # read at load time only (engine.load_universal_checkpoint())
        try:
            client_state = super().load_checkpoint(universal, weights_only)
        finally:
            config.load_universal_checkpoint = False
        # ZeRO-3's universal load gives every flat parameter group the same step tensor; Adam increments
        # each group's step in place, so the shared one advanced once per group per step (measured: 6
        # after 2 steps from step 2) and bias correction drifted. One tensor per group, as at save time.
        for state in self.deepspeed_engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return client_state


def _say(line: str) -> None:
    print(line, flush=True)


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
