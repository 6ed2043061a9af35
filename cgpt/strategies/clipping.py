"""Gradient clipping by global norm, for plain and sharded (FSDP2 DTensor) gradients."""

from __future__ import annotations

from typing import Any

import torch


def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of ``max_norm``; returns the pre-clip norm.

    Correct for plain tensors (single device, DDP: gradients are already all-reduced) and for FSDP2's
    sharded DTensor gradients, whose local norms are reduced over the mesh before clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = _total_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def grad_norm(parameters: Any) -> torch.Tensor:
    """The global L2 norm of the gradients, without clipping (plain and FSDP2 DTensor gradients)."""
    params = [p for p in parameters if p.grad is not None]
    return _total_norm(params) if params else torch.zeros(())


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: a partial norm on each shard
        norm = norm.full_tensor()
    return norm
