"""FSDP2: ``fully_shard`` on each transformer block, then on the root, through Lightning's ModelParallelStrategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from cgpt.model import Block
from cgpt.strategies.activation_checkpointing import apply_activation_checkpointing
from cgpt.strategies.checkpoint_io import atomic_dir_save, remove_checkpoint


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
        activation_checkpointing: recompute each block's activations in backward.
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
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            data_parallel_size=num_nodes, tensor_parallel_size=devices_per_node,
            save_distributed_checkpoint=sharded_checkpoint, process_group_backend=process_group_backend,
        )  # fmt: skip
        self.sharding = sharding
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
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
        from torch.distributed.fsdp import FSDPModule

        model = self.lightning_module.model
        if model is not None and not isinstance(model, FSDPModule):
            if self.activation_checkpointing:
                apply_activation_checkpointing(model)
            shard_gpt(model, self.fsdp_mesh, self.reshard_after_forward, self._mp_policy())
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
        atomic_dir_save(self, filepath, lambda tmp: save(checkpoint, tmp))

    def remove_checkpoint(self, filepath: Any) -> None:
        remove_checkpoint(self, filepath)

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
    return model
