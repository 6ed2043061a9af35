"""The language-model head: logits, or the next-token loss without materialising the logits.

With the GPT-2 vocabulary (50,257) and a small width, the head is most of a training step: its
logits are ``tokens x 50257`` numbers, written, copied to fp32, soft-maxed, read back twice by the
backward. :func:`linear_cross_entropy` instead walks the tokens in chunks whose logits fit in the
CPU's cache, and computes the gradients of the head's input and weight in the same pass (the
gradient of cross entropy is ``softmax - onehot``, known as soon as the softmax is), so nothing of
size ``tokens x vocab`` is ever kept. The matmuls are the same three as before; the memory traffic
is not. On 2 CPU cores this halves the head's time (bench/train_throughput.py, docs/design/fused-lm-head.md).

:class:`LMHead` is an ``nn.Linear`` (same parameter name, ``lm_head.weight``) whose forward also
takes the targets, so the loss runs inside the module call: FSDP and DeepSpeed ZeRO-3 gather the
weight around module calls, not around attribute reads.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Logits of one chunk in fp32 are sized to stay in a CPU's last-level cache (measured best at
# ~24 MiB: 128 tokens x 50257 on an EPYC with 2 cores; 64 and 256 tokens were 13-19% slower).
CHUNK_BYTES = 24 << 20
PAD_VOCAB_MULTIPLE = 64  # the full-logits loss may pad the vocabulary to this (50257 -> 50304)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: the power of two whose fp32 logits come nearest :data:`CHUNK_BYTES`."""
    return 2 ** max(3, round(math.log2(CHUNK_BYTES / (4 * vocab_size))))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for the head (bf16 under bf16 autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses; the gradients are computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets, scale, ignore_index, chunk):  # noqa: ANN001, ANN205
        dtype = _compute_dtype(x)
        xs = (x * scale if scale != 1.0 else x).to(dtype)  # the logit multiplier (muP) folded in
        w = weight.to(dtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        # Ignored tokens are masked in the (N, C) tensors, never in the (chunk, V) ones.
        xs_valid = xs * valid[:, None].to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        total = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
        for s in range(0, x.size(0), chunk):
            yc = safe[s : s + chunk, None]
            logp = torch.log_softmax(xs[s : s + chunk] @ w.t(), dim=-1, dtype=acc)  # (n, V)
            total -= (logp.gather(1, yc).squeeze(1) * valid[s : s + chunk]).sum()
            g = logp.exp_()  # softmax: d(loss)/d(logits) = softmax - onehot
            g.scatter_add_(1, yc, torch.full_like(yc, -1, dtype=g.dtype))
            g = g.to(dtype)
            grad_x[s : s + chunk] = g @ w
            grad_w += g.t() @ xs_valid[s : s + chunk]
        grad_x *= valid[:, None]
        if scale != 1.0:
            grad_x *= scale
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x * grad_total).to(x_dtype), (grad_w * grad_total).to(w_dtype), None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross entropy of ``(x @ weight.T) * scale`` against ``targets``, tokens in chunks.

    Equal to ``F.cross_entropy((x @ weight.T * scale).float(), targets, ignore_index=...)`` (the
    mean over non-ignored targets; NaN when all are ignored), without ever holding all the logits.
    ``x`` (N, C), ``weight`` (V, C), ``targets`` (N,). Under autocast the matmuls run in the autocast
    dtype and the softmax in fp32, as the unfused head does.
    """
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    chunk = chunk or chunk_tokens(weight.size(0))
    count = (targets != ignore_index).sum()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, scale, ignore_index, chunk) / count
    # Evaluation: the losses alone, still in chunks.
    dtype = _compute_dtype(x)
    acc = torch.promote_types(dtype, torch.float32)
    xs, w = (x * scale).to(dtype), weight.to(dtype)
    total = torch.zeros((), dtype=acc, device=x.device)
    for s in range(0, x.size(0), chunk):
        logits = (xs[s : s + chunk] @ w.t()).to(acc)
        total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=ignore_index, reduction="sum")
    return total / count


class LMHead(nn.Linear):
    """The output projection (tied to the token embedding by :class:`cgpt.model.GPT`).

    ``head(x)`` returns logits; ``head(x, targets)`` returns the mean next-token loss, fused
    (:func:`linear_cross_entropy`) when ``fused`` is true, else from the full fp32 logits.
    ``scale`` multiplies the logits (muP's output multiplier; 1.0 otherwise).
    """

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk: int | None = None  # tokens per chunk of the fused loss; None: chunk_tokens(vocab)
        # The full-logits loss pads the vocabulary to a multiple of this (None: not padded). Inside
        # the loss only: the weight, the logits returned and checkpoints keep the real vocabulary.
        self.pad_vocab_to: int | None = None

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        scale: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        fused: bool = False,
    ) -> torch.Tensor:
        if targets is not None and fused:
            return linear_cross_entropy(x, self.weight, targets, scale, ignore_index, self.chunk)
        if targets is not None and self.pad_vocab_to and self.out_features % self.pad_vocab_to:
            return padded_cross_entropy(x, self.weight, targets, scale, ignore_index, self.pad_vocab_to)
        logits = super().forward(x)
        if scale != 1.0:
            logits = logits * scale
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


def padded_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    multiple: int = 64,
) -> torch.Tensor:
    """The full-logits loss with the vocabulary padded to a multiple of ``multiple`` (50257 -> 50304).

    Matmuls whose output width is a multiple of 64 run faster on CPUs (a fifth less CPU time for
    the head at d_model 384 in fp32: docs/design/fused-lm-head.md). The padded rows of the weight
    are zeros and their logits are set to -inf, so the softmax, the loss and every gradient equal
    the unpadded ones (the padded rows' gradient is dropped with the padding).
    """
    vocab = weight.size(0)
    padded = -(-vocab // multiple) * multiple
    logits = F.linear(x, F.pad(weight, (0, 0, 0, padded - vocab)))
    if scale != 1.0:
        logits = logits * scale
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in fp32 at least
    logits[..., vocab:] = float("-inf")
    return F.cross_entropy(logits.view(-1, padded), targets.reshape(-1), ignore_index=ignore_index)


def time_heads(
    tokens: int, d_model: int, vocab: int, dtype: torch.dtype, chunks: list[int], reps: int = 2
) -> dict[str, float]:
    """Process CPU seconds of one forward + backward of each head on this CPU: ``full`` (fp32 logits
    then ``F.cross_entropy``, what ``fused_loss=false`` runs), ``full/pad64`` (the same over the
    vocabulary padded to a multiple of 64: :func:`padded_cross_entropy`) and ``fused/N`` for each
    chunk size N.

    The best of ``reps`` after a warm-up, variants interleaved; CPU time rather than wall time, so
    other processes on the machine do not decide the choice.
    """
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, d_model, generator=g)
    w0 = torch.randn(vocab, d_model, generator=g) * 0.02
    y = torch.randint(0, vocab, (tokens,), generator=g)
    autocast = dtype != torch.float32

    def full(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype, enabled=autocast):
            logits = x @ w.t()
        return F.cross_entropy(logits.float(), y)

    def full_padded(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype, enabled=autocast):
            return padded_cross_entropy(x, w, y, multiple=PAD_VOCAB_MULTIPLE)

    def fused(chunk: int):  # noqa: ANN202
        def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype, enabled=autocast):
                return linear_cross_entropy(x, w, y, chunk=chunk)

        return loss

    variants = {"full": full, **{f"fused/{c}": fused(c) for c in chunks}}
    if vocab % PAD_VOCAB_MULTIPLE:
        variants[f"full/pad{PAD_VOCAB_MULTIPLE}"] = full_padded
    best = dict.fromkeys(variants, float("inf"))
    for rep in range(reps + 1):  # repetition 0 warms up
        for name, fn in variants.items():
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            start = time.process_time()
            fn(x, w).backward()
            seconds = time.process_time() - start
            if rep:
                best[name] = min(best[name], seconds)
    return best
