"""LM head + cross entropy, forward and backward: full logits vs the fused chunked head.

    python bench/lm_head_loss.py                                 # the demo's head: 2048 tokens, d 128
    python bench/lm_head_loss.py --tokens 16384 --d-model 768 --device cuda --chunks 1024 4096

Prints milliseconds per forward+backward (median of interleaved repetitions) and, on CUDA, the
peak memory of each variant. ``full`` is ``F.cross_entropy`` over the fp32 copy of all logits (what
``fused_loss=false`` runs); ``fused/N`` is :func:`cgpt.lm_head.linear_cross_entropy` with N tokens
per chunk (``auto`` = :func:`cgpt.lm_head.chunk_tokens`). Needs only torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cgpt.lm_head import chunk_tokens, linear_cross_entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Time every variant; returns {variant: {"ms": median, "peak_mb": ..., "loss": ...}}."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"skipped": {"reason": "CUDA is not available on this machine"}}  # type: ignore[dict-item]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(args.tokens, args.d_model, generator=g).to(device)
    w0 = (torch.randn(args.vocab, args.d_model, generator=g) * 0.02).to(device)
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)

    def full(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            logits = x @ w.t()
        return F.cross_entropy(logits.float(), y)

    def fused(chunk: int):  # noqa: ANN202
        def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                return linear_cross_entropy(x, w, y, chunk=chunk)

        return loss

    chunks = [chunk_tokens(args.vocab) if c == "auto" else int(c) for c in args.chunks]
    variants = {"full": full, **{f"fused/{c}": fused(c) for c in chunks}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    losses: dict[str, float] = {}
    for rep in range(args.repeats + 1):  # repetition 0 warms up
        for name, fn in variants.items():
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            loss = fn(x, w)
            loss.backward()
            _sync(device)
            losses[name] = loss.item()
            if rep:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        name: {"ms": 1e3 * statistics.median(t), "peak_mb": peaks.get(name, float("nan")), "loss": losses[name]}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (micro-batch x sequence length)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the matmuls")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--chunks", nargs="+", default=["auto", "64", "256"], help="tokens per chunk ('auto' too)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    if "skipped" in result:
        print(f"skipped: {result['skipped']['reason']}")
        return 0
    base = result["full"]["ms"]
    print(f"{args.tokens} tokens x d {args.d_model} x vocab {args.vocab}, {args.dtype}, {args.device}:")
    for name, r in result.items():
        mem = "" if r["peak_mb"] != r["peak_mb"] else f"  peak {r['peak_mb']:,.0f} MiB"
        print(f"  {name:12s} {r['ms']:9.1f} ms  {base / r['ms']:5.2f}x{mem}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
