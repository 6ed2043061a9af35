"""The C allocator's behaviour for training on CPUs: keep freed memory for the next step.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` on free, and returns freed memory at the top of its heap
to the OS. A CPU training step allocates and frees the same large buffers every step (activations,
gradients, chunks of the LM head's logits of up to 103 MB), so every step faults pages in again and
the kernel zeroes them: a quarter of the demo's time was system time. Turning glibc's mmap path
off and raising its trim threshold keeps freed blocks in the heap, where the next step reuses them
(what jemalloc and tcmalloc, which PyTorch's CPU tuning guide recommends, do by design). Measured on
the demo: +34% tokens/s in fp32, identical losses (docs/design/cpu-training-speed.md).

The price is that the process keeps its peak memory until it exits, so cgpt does this only for runs
that train on the CPU (``trainer.host_malloc=auto``), never for GPU runs, where eight ranks share
the host's memory and checkpoint gathers would each hold their peak. It leaves the allocator alone
when the user has tuned it (``MALLOC_*`` variables, or jemalloc/tcmalloc in ``LD_PRELOAD``) or the
C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory at the top of the heap is returned to the OS only above this: the largest value
# mallopt's int takes (2 GiB), far above what a step frees.
TRIM_THRESHOLD = 2**31 - 1
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied = False


def user_allocator() -> str | None:
    """What the user already chose for the C allocator (a ``MALLOC_*`` variable or a preloaded
    allocator), or None."""
    for name in USER_SETTINGS:
        if name in os.environ:
            return f"{name} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (no mmap per large block, no trimming). Returns whether
    the setting is in force; idempotent."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def resolve_host_malloc(setting: str | None, device_type: str) -> tuple[bool, str]:
    """Apply ``trainer.host_malloc`` (``auto``, ``keep`` or ``default``) for a run on ``device_type``;
    returns (in force, the run's one-line explanation)."""
    setting = setting or "auto"
    if setting not in ("auto", "keep", "default"):
        raise ValueError(f"trainer.host_malloc={setting!r}: use auto, keep (reuse freed memory) or default (glibc's)")
    if setting == "default":
        return False, "host malloc: glibc's defaults: set by trainer.host_malloc=default"
    if setting == "auto" and device_type != "cpu":
        return False, "host malloc: glibc's defaults (auto): the run trains on a GPU"
    chosen = user_allocator() if setting == "auto" else None
    if chosen:
        return False, f"host malloc: left as configured (auto): {chosen}"
    if not keep_freed_memory():
        return False, "host malloc: glibc's defaults: the C library is not glibc"
    why = ": set by trainer.host_malloc=keep" if setting == "keep" else " (auto): the run trains on the CPU"
    return True, f"host malloc: freed memory kept for reuse{why} (docs/design/cpu-training-speed.md)"
