"""What the device can do: bf16 support, the precision to train in, and peak FLOP/s for MFU."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from cgpt.config import ConfigError

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by substring of the CUDA device name.
GPU_BF16_PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,  # how CUDA names the SXM H100
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; V100 has no bf16
}


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU executes bf16 natively (AVX512_BF16 or AMX), so bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def default_precision(accelerator: str | None = None) -> str:
    """The fastest safe Lightning precision for the accelerator: bf16 autocast where the hardware
    has bf16, else fp32. Never fp16 on a CPU."""
    use_cuda = torch.cuda.is_available() if accelerator in (None, "auto", "gpu", "cuda") else False
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def resolve_precision(precision: str | int | None, accelerator: str | None = None) -> str:
    """Turn ``auto``/``None`` into :func:`default_precision`; reject what the device lacks
    (:class:`~cgpt.config.ConfigError`, saying what to use instead)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible; set trainer.accelerator=cpu"
        )
    if precision in (None, "auto"):
        return default_precision(accelerator)
    p = str(precision)
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if on_cpu and p.startswith("16"):
        raise ConfigError(f"trainer.precision={p}: fp16 is not supported on CPU; use bf16-mixed or 32-true")
    if not on_cpu and p.startswith("bf16") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={p}: this GPU has no bf16; use 16-mixed or 32-true")
    return p


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """The matmul dtype a Lightning precision string trains in (``bf16-mixed`` -> bfloat16)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32


def default_fused_loss(device: torch.device | str) -> bool:
    """Whether the model's loss uses the fused chunked head (:mod:`cgpt.lm_head`) by default.

    On CPUs it is about twice as fast as the head over full logits (docs/design/fused-lm-head.md). On
    CUDA the full-logits head is kept as the default, where ``torch.compile`` fuses the
    softmax: the fused head is unmeasured there (it still saves the logits' memory; switch it on
    with ``fused_loss=true``).
    """
    return torch.device(device).type == "cpu"


def resolve_fused_loss(fused_loss: bool | str | None) -> bool | str:
    """Validate a ``fused_loss`` setting: a boolean (or its spelling), or ``"auto"`` (also ``None``)."""
    if fused_loss in (None, "auto"):
        return "auto"
    return _switch("fused_loss", fused_loss)


def default_compile(device: torch.device | str | None = None) -> bool:
    """Whether ``torch.compile`` is the default on ``device``: the one place this is decided.

    On CUDA it pays off (fused kernels, fewer launches). On CPUs it is off: see
    docs/design/cpu-training-speed.md for the measurement that decided it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device.type == "cuda"


def resolve_compile(compile: bool | str | None, device: torch.device | str | None = None) -> bool:
    """Turn ``auto``/``None`` into :func:`default_compile`; accept booleans and their spellings."""
    if compile in (None, "auto"):
        return default_compile(device)
    return _switch("compile", compile)


def _switch(name: str, value: bool | str) -> bool:
    """A boolean setting given as a bool or a word (true/false, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
    if str(value).lower() not in words:
        raise ValueError(f"{name}={value!r}: use true, false or auto")
    return words[str(value).lower()]


def gpu_table_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called ``name`` from :data:`GPU_BF16_PEAK_FLOPS`, or None.

    The longest matching key wins, so ``H100 SXM`` beats ``H100`` and ``GH200`` beats ``H200``."""
    matches = [key for key in GPU_BF16_PEAK_FLOPS if key in name]
    return GPU_BF16_PEAK_FLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak FLOP/s of ``device`` in ``dtype``: the table for known GPUs, a measured large matmul
    on CPUs and unknown GPUs. On GPUs fp32 counts at half the bf16 peak (TF32 tensor cores)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        value = gpu_table_peak(torch.cuda.get_device_name(device))
        if value is not None:
            return value if dtype in (torch.bfloat16, torch.float16) else value / 2
    return measured_matmul_flops(device, dtype)


@functools.cache
def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype`` (a practical peak)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - start > seconds:
            break
    return 2 * n**3 * iters / (time.perf_counter() - start)
