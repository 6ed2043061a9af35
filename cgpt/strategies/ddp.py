"""DDP: Lightning's, plus per-block activation checkpointing applied before wrapping."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from cgpt.strategies.activation_checkpointing import apply_activation_checkpointing


class CgptDDPStrategy(DDPStrategy):
    """DDP (NCCL on GPUs, gloo on CPUs).

    Args:
        activation_checkpointing: recompute each block's activations in backward.
        **kwargs: Lightning's ``DDPStrategy`` arguments (``find_unused_parameters``, ...).
    """

    strategy_name = "cgpt_ddp"

    def __init__(self, activation_checkpointing: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activation_checkpointing = activation_checkpointing

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.activation_checkpointing and getattr(self.lightning_module, "model", None) is not None:
            apply_activation_checkpointing(self.lightning_module.model)
        return super()._setup_model(model)


def average_ddp_gradients(strategy: Any, params: list[torch.Tensor]) -> None:
    """Average local gradients over the ranks as DDP's reducer does (divide by the world size, then
    sum), for gradients computed outside the DDP wrapper; nothing under other strategies."""
    if not isinstance(strategy, DDPStrategy) or strategy.world_size < 2:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads).div_(strategy.world_size)
    torch.distributed.all_reduce(flat)
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)
