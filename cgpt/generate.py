"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgpt.model import GPT


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``logits`` (B, vocab); ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    prompt_lengths: torch.Tensor | list[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens``; return ``(B, T + new)`` token ids.

    Prompts of different lengths are passed left-padded in ``idx`` with their true lengths in
    ``prompt_lengths``; padding is masked out of attention and positions start at each prompt's
    first real token. Rows that emit ``eos_id`` keep emitting it; decoding stops early when all
    rows have. ``use_cache=False`` recomputes the whole prefix each step (for checking).
    """
    B, T = idx.shape
    device = idx.device
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context of {model.config.block_size}"
        )
    lengths = torch.as_tensor(prompt_lengths if prompt_lengths is not None else [T] * B, device=device)
    pad = T - lengths  # left padding per row
    total = T + max_new_tokens
    key_pos = torch.arange(total, device=device)
    real = key_pos[None, :] >= pad[:, None]  # (B, total): False on padding columns
    was_training = model.training
    model.eval()
    out = idx
    done = torch.zeros(B, dtype=torch.bool, device=device)
    try:
        if use_cache:
            model.setup_kv_cache(B, total, dtype=next(model.parameters()).dtype)
        start = 0
        step_input = idx
        for _ in range(max_new_tokens):
            t_now = out.size(1)
            q_pos = torch.arange(start, t_now, device=device)
            k_len = t_now
            # (B, 1, t_q, t_k): causal and not padding; a padding query sees itself only, so no row
            # is fully masked (that would give NaNs that leak through the values of later layers).
            causal = key_pos[None, None, :k_len] <= q_pos[None, :, None]
            itself = key_pos[None, None, :k_len] == q_pos[None, :, None]
            mask = (causal & (real[:, None, :k_len] | itself))[:, None]
            positions = (q_pos[None, :] - pad[:, None]).clamp(min=0)
            logits = model(step_input, start=start if use_cache else 0, attn_mask=mask, position_ids=positions)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
            if use_cache:
                start, step_input = t_now, nxt[:, None]
            else:
                step_input = out
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    return out
