"""Per-device memory estimate of a training run: parameters, gradients, optimizer state, activations.

A planning figure (within ~20% of measured peaks for GPT-style models), not an allocator trace:
it ignores the CUDA context (~0.5-1 GiB), allocator fragmentation and communication buffers
beyond one gathered block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cgpt.config import ModelConfig

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (``host_*``: bytes of CPU memory per process, from offload)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    host_offload: float
    strategy: str

    @property
    def device_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def format(self) -> str:
        keys = ("params", "grads", "optimizer", "activations", "buffers")
        parts = [f"{k} {getattr(self, k) / GIB:.2f}" for k in keys]
        line = f"memory per device ({self.strategy}): {', '.join(parts)} -> total {self.device_total / GIB:.2f} GiB"
        if self.host_offload:
            line += f"; offloaded to CPU per process {self.host_offload / GIB:.2f} GiB"
        return line


def activation_bytes(
    config: ModelConfig, micro_batch: int, seq_len: int, bytes_per_act: int, checkpointing: bool
) -> float:
    """Activations kept for backward by one micro-batch (Korthikanti et al. 2022, fused SDPA attention:
    ~34·s·b·h bytes per layer in 16-bit), plus the logits and their fp32 loss copy.

    With activation checkpointing only each block's input is kept, plus one block recomputed at a time.
    """
    sbh = seq_len * micro_batch * config.d_model
    per_layer = 17 * sbh * bytes_per_act  # 34 bytes at 2 bytes/element = 17 elements per (s, b, h)
    layers = (config.n_layer * sbh * bytes_per_act + per_layer) if checkpointing else config.n_layer * per_layer
    logits = seq_len * micro_batch * config.vocab_size * (bytes_per_act + 4 + 4)  # logits, fp32 copy, its grad
    return layers + logits


def estimate_memory(
    config: ModelConfig,
    strategy: dict,
    precision: str,
    micro_batch: int,
    seq_len: int,
    devices: int = 1,
    num_nodes: int = 1,
) -> MemoryEstimate:
    """Per-device memory of training ``config`` with AdamW under ``strategy`` (a conf/strategy dict)."""
    from cgpt.strategies.registry import offloaded, spec_for, validate_strategy_config

    strategy = validate_strategy_config(strategy)
    spec = spec_for(strategy)
    n = config.num_params()
    world = devices * num_nodes
    half = str(precision).startswith(("bf16", "16"))
    true_half = str(precision).endswith("-true") and half
    act_bytes = 2 if half else 4
    ckpt = bool(strategy.get("activation_checkpointing"))
    # Defaults: DDP with fp32 weights and grads (autocast computes in 16-bit), AdamW's two fp32 moments.
    p_bytes, g_bytes, o_bytes = (2, 2, 8) if true_half else (4, 4, 8)
    if spec.kind == "deepspeed":
        # DeepSpeed bf16/fp16: 16-bit weights and grads on device, fp32 master copy in the optimizer state.
        p_bytes, g_bytes, o_bytes = (2, 2, 12) if half else (4, 4, 8)
    params, grads, optim = n * p_bytes, n * g_bytes, n * o_bytes
    # Sharded state is split over the ranks (HSDP: over one node's ranks; it replicates across nodes).
    shard = devices if strategy.get("sharding") == "hybrid" else world
    params /= shard if "parameters" in spec.shards else 1
    grads /= shard if "gradients" in spec.shards else 1
    optim /= shard if "optimizer" in spec.shards else 1
    buffers = 0.0
    if spec.kind == "fsdp":
        # Two gathered blocks at a time (current + prefetch) plus the root (embeddings, head).
        per_block = 12 * config.d_model**2 + 2 * config.d_model * config.d_ffn - 8 * config.d_model**2
        gather = 2 if half and strategy.get("mixed_precision", True) else p_bytes
        buffers = (2 * per_block + (config.vocab_size + config.block_size) * config.d_model) * gather * 2
    elif spec.kind == "deepspeed":
        if "parameters" in spec.shards:
            buffers = 2 * float(strategy.get("allgather_bucket_size") or 2e8) * p_bytes  # gathered prefetch
        else:
            buffers = float(strategy.get("reduce_bucket_size") or 2e8) * g_bytes
        buffers = min(buffers, n * g_bytes)
    host = 0.0
    for state in offloaded(strategy):
        if state == "optimizer":
            host, optim = host + optim, 0.0
        else:
            host, params = host + params, 0.0
    acts = activation_bytes(config, micro_batch, seq_len, act_bytes, ckpt)
    return MemoryEstimate(params, grads, optim, acts, buffers, host, _describe(strategy))


def _describe(strategy: dict) -> str:
    name = strategy.get("name", "auto")
    if name == "deepspeed":
        name = f"deepspeed ZeRO-{strategy.get('stage')}" + (" offload" if strategy.get("offload_optimizer") else "")
    if name == "fsdp" and strategy.get("sharding") == "hybrid":
        name = "fsdp hybrid"
    if strategy.get("activation_checkpointing"):
        name += " + activation checkpointing"
    return name


def device_memory_bytes(accelerator: str | None, devices: int = 1) -> float | None:
    """Memory of one device: the GPU's total, or (CPU) physical memory shared by ``devices`` processes."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if not on_cpu and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(devices, 1)
    except (ValueError, OSError, AttributeError):
        return None
