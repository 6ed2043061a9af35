"""What the device can do: bf16 support, the precision to train in, and peak FLOP/s for MFU."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 matmuls are emulated under them
# (measured 1.2 GFLOP/s with AVX2 against 390 uncapped on an AVX512_BF16 CPU).
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The oneDNN ISA cap set in the environment when it rules out native bf16, else None."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(var, "").strip().upper()
        if value in _ONEDNN_ISAS_WITHOUT_BF16:
            return f"{var}={value}"
    return None


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU executes bf16 natively (AVX512_BF16 or AMX), so bf16 autocast pays off;
    False also where oneDNN is capped below it (:func:`onednn_isa_cap`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")) and onednn_isa_cap() is None


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
    """Peak FLOP/s of ``device`` in ``dtype``: the table for known GPUs; on CPUs and unknown GPUs a
    large matmul measured once per machine and cached (:func:`cached_peak_flops`). On GPUs fp32
    counts at half the bf16 peak (TF32 tensor cores)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        value = gpu_table_peak(torch.cuda.get_device_name(device))
        if value is not None:
            return value if dtype in (torch.bfloat16, torch.float16) else value / 2
    return cached_peak_flops(device, dtype)


PEAK_CACHE_ENV = "CGPT_CACHE_DIR"  # folder of cgpt's per-machine cache (default ~/.cache/cgpt)


def peak_cache_path() -> Path:
    """Where measured peaks are kept: ``$CGPT_CACHE_DIR`` or ``$XDG_CACHE_HOME/cgpt`` (``~/.cache/cgpt``)."""
    folder = os.environ.get(PEAK_CACHE_ENV)
    if not folder:
        folder = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cgpt")
    return Path(folder) / "peak_flops.json"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on: the processor, the threads torch uses, the instruction set
    the kernels may use (ATen's capability, a oneDNN cap), the dtype, torch."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model()
        name += f", {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
        name += f", {onednn_isa_cap()}" if onednn_isa_cap() else ""
    return f"{device.type}: {name} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cache_read(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _cache_write(path: Path, table: dict[str, Any]) -> None:
    """Atomically; a read-only home is fine: the run measures and uses the value without keeping it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def cached_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The measured peak of this machine (:func:`machine_key`) from :func:`peak_cache_path`;
    measured and stored the first time. A peak measured at every start-up read low on a busy
    machine, so a run's MFU came out above 90%; one quiet measurement, kept, is stable.
    Delete the file to measure again (after a hardware or torch change the key changes anyway)."""
    path, key = peak_cache_path(), machine_key(device, dtype)
    table = _cache_read(path)
    entry = table.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), int | float) and entry["flops"] > 0:
        return float(entry["flops"])
    flops = measured_matmul_flops(device, dtype)
    table[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _cache_write(path, table)
    return flops


HEAD_PROBE_TOKENS = 512  # tokens the head choice is timed on (the ranking holds at any count: both stream the logits)


@dataclass(frozen=True)
class HeadChoice:
    """Which LM-head loss a CPU run uses: ``fused`` with ``chunk`` tokens per chunk, or full logits."""

    fused: bool
    chunk: int | None
    seconds: dict[str, float]  # the measurement it came from (CPU seconds per head forward+backward)
    pad: int | None = None  # full logits over the vocabulary padded to a multiple of this

    def describe(self) -> str:
        chosen = f"fused/{self.chunk}" if self.fused else (f"full/pad{self.pad}" if self.pad else "full")
        others = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(self.seconds.items()) if k != chosen)
        padded = f", vocabulary padded to a multiple of {self.pad}" if self.pad else ""
        what = f"on, {self.chunk} tokens per chunk" if self.fused else f"off (full logits{padded})"
        return f"{what}: measured on this CPU, {chosen} {self.seconds[chosen] * 1e3:.0f} ms vs {others}"


def choose_lm_head(dtype: torch.dtype, d_model: int, vocab: int) -> HeadChoice:
    """The fastest LM-head loss for this CPU, dtype and head shape: full logits (over the real or
    the padded vocabulary), or the fused head at :func:`cgpt.lm_head.chunk_tokens` or 4x as many
    tokens per chunk. Timed once per machine
    (:func:`cgpt.lm_head.time_heads`, ~a second per variant) and kept beside the peak
    (``lm_head.json`` in the folder of :func:`peak_cache_path`); delete it to measure again.

    Why measured: on an AVX512_BF16 CPU in bf16 the fused head is 1.3-1.6x faster than full logits,
    but on an AVX2-only CPU in fp32 it was 0.8x at d_model 384 (docs/design/fused-lm-head.md).
    """
    from cgpt.lm_head import chunk_tokens, time_heads

    path = peak_cache_path().with_name("lm_head.json")
    key = f"{machine_key(torch.device('cpu'), dtype)} | d_model {d_model} | vocab {vocab}"
    table = _cache_read(path)
    entry = table.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("seconds"), dict) and entry["seconds"].get("full")):
        base = chunk_tokens(vocab)
        seconds = time_heads(HEAD_PROBE_TOKENS, d_model, vocab, dtype, [base, 4 * base], reps=3)
        entry = {"seconds": seconds, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        table[key] = entry
        _cache_write(path, table)
    seconds = {str(k): float(v) for k, v in entry["seconds"].items()}
    best = min(seconds, key=seconds.__getitem__)
    if best == "full":
        return HeadChoice(False, None, seconds)
    if best.startswith("full/pad"):
        return HeadChoice(False, None, seconds, int(best.removeprefix("full/pad")))
    return HeadChoice(True, int(best.split("/")[1]), seconds)


@functools.cache
def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0, windows: int = 8
) -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype`` (a practical peak): the best of
    ``windows`` timings over ``seconds`` in all, since other work on the machine only slows one down."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    for _ in range(windows):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    return best


# --- what a run decided, and why (its first lines) ----------------------------------------------
def accelerator_device_type(accelerator: str | None) -> str:
    """``cpu`` or ``cuda``: the device a ``trainer.accelerator`` setting trains on."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(accelerator)


def explain_precision(setting: str | int | None, precision: str, accelerator: str | None = None) -> str:
    """One line: the precision a run trains in and why (``setting`` is ``trainer.precision``)."""
    if setting not in (None, "auto"):
        return f"precision {precision}: set by trainer.precision"
    if accelerator_device_type(accelerator) == "cuda":
        why = "this GPU supports bf16" if precision.startswith("bf16") else "this GPU has no bf16"
    elif cpu_has_bf16():
        why = "this CPU has AVX512_BF16/AMX, where bf16 matmuls run about 2x faster than fp32"
    elif onednn_isa_cap():
        why = f"{onednn_isa_cap()} caps oneDNN below bf16, so bf16 would be emulated and far slower than fp32"
    else:
        why = "this CPU has no AVX512_BF16/AMX, so bf16 would be emulated and far slower than fp32"
    return f"precision {precision} (auto): {why}"


def explain_compile(setting: bool | str | None, accelerator: str | None = None) -> str:
    """One line: whether the model is compiled and why (``setting`` is the ``compile`` key)."""
    device = accelerator_device_type(accelerator)
    on = resolve_compile(setting, device)
    if setting not in (None, "auto"):
        return f"compile {'on' if on else 'off'}: set by compile={setting}"
    if on:
        return "compile on (auto): CUDA, where fused kernels pay for the compile time"
    return "compile off (auto): on CPUs torch.compile was not faster (docs/design/cpu-training-speed.md)"


def explain_fused_loss(
    setting: bool | str | None, accelerator: str | None = None, choice: HeadChoice | None = None
) -> str:
    """One line: which LM-head loss the run uses and why (``setting`` is the ``fused_loss`` key,
    ``choice`` the measured :func:`choose_lm_head` behind ``auto`` on a CPU)."""
    device = accelerator_device_type(accelerator)
    resolved = resolve_fused_loss(setting)
    if resolved != "auto":
        return f"fused LM-head loss {'on' if resolved else 'off'}: set by fused_loss={setting}"
    if choice is not None:
        return f"fused LM-head loss {choice.describe()} (auto)"
    if default_fused_loss(device):
        return (
            "fused LM-head loss on (auto): on CPUs the chunked head skips the tokens x vocab logits "
            "(docs/design/fused-lm-head.md)"
        )
    return "fused LM-head loss off (auto): CUDA keeps the full-logits head, which compile fuses"
