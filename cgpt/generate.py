"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling.

Fast path: prompts without padding prefill with ``is_causal`` attention and decode one token at a
time against the cache with no mask at all. Left-padded batches build their masks from one
precomputed ``(B, total)`` "real token" row per step (no per-step (T, T) causal masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cgpt.config import GPT2_EOS_ID
from cgpt.model import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the top-k and outside the top-p nucleus of each row (B, vocab).

    top-k keeps the ``top_k`` largest logits (ties with the k-th are kept). top-p keeps the smallest
    set of most probable tokens whose total probability reaches ``top_p`` (at least one token),
    as in Holtzman et al. 2019 and transformers' ``TopPLogitsWarper``.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


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
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(
    model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if idx.ndim != 2 or idx.size(1) == 0:
        raise ValueError(
            f"idx must be a (batch, prompt_len) tensor of token ids with prompt_len >= 1, got {tuple(idx.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {model.config.block_size}"
        )


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

    ``temperature=0`` is greedy. Prompts of different lengths are passed left-padded in ``idx``
    with their true lengths in ``prompt_lengths``; padding is masked out of attention and
    positions start at each prompt's first real token, so every row decodes exactly as it would
    alone. Rows that emit ``eos_id`` keep emitting it; decoding stops early when all rows have.
    ``use_cache=False`` recomputes the whole prefix each step (for checking).
    Decoding runs under ``torch.inference_mode`` (less per-op bookkeeping than ``no_grad``); the
    returned ids are an ordinary tensor, usable as input to a later training step.
    """
    _check_args(model, idx, max_new_tokens, temperature, top_k, top_p)
    B, T = idx.shape
    device = idx.device
    total = T + max_new_tokens
    lengths = torch.as_tensor(prompt_lengths if prompt_lengths is not None else [T] * B, device=device)
    if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"prompt_lengths must hold {B} values in 1..{T}, got {lengths.tolist()}")
    pad = T - lengths  # left padding per row
    padded = bool((pad > 0).any())
    key_pos = torch.arange(total, device=device)
    real = key_pos[None, :] >= pad[:, None]  # (B, total): False on padding columns
    positions_all = (key_pos[None, :] - pad[:, None]).clamp(min=0)  # (B, total)

    def mask_and_positions(q_start: int, q_end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not padded:
            return None, None  # is_causal prefill, unmasked single-token decode
        positions = positions_all[:, q_start:q_end]
        if q_end - q_start == 1 and use_cache:
            return real[:, None, None, :q_end], positions  # (B, 1, 1, t_k): the last query sees all real keys
        q_pos = key_pos[q_start:q_end]
        causal = key_pos[None, :q_end] <= q_pos[:, None]  # (t_q, t_k)
        # A padding query sees itself only, so no row is fully masked (that would give NaNs that
        # leak through the values of later layers).
        itself = key_pos[None, :q_end] == q_pos[:, None]
        return (causal & (real[:, None, :q_end] | itself))[:, None], positions  # (B, 1, t_q, t_k)

    was_training = model.training
    model.eval()
    # inference_mode: less per-op bookkeeping than no_grad; the ids are cloned out of it at the end.
    with torch.inference_mode():
        out = torch.empty(B, total, dtype=idx.dtype, device=device)
        out[:, :T] = idx
        done = torch.zeros(B, dtype=torch.bool, device=device)
        t_now = T
        try:
            if use_cache:
                model.setup_kv_cache(B, total, dtype=next(model.parameters()).dtype)
            start = 0
            for _ in range(max_new_tokens):
                mask, positions = mask_and_positions(start, t_now)
                logits = model(out[:, start:t_now], start=start, attn_mask=mask, position_ids=positions, last_only=True)
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out[:, t_now] = nxt
                t_now += 1
                if eos_id is not None and bool(done.all()):
                    break
                if use_cache:
                    start = t_now - 1
        finally:
            model.clear_kv_cache()
            model.train(was_training)
    return out[:, :t_now].clone()  # a normal tensor: usable in a later training step


def complete(
    model: GPT,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """Completions (the new text only) of ``prompts``, decoded as one left-padded batch."""
    from cgpt.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    encoded = tok.encode_batch(prompts)
    if any(len(e) == 0 for e in encoded):
        raise ValueError("empty prompt: give every prompt at least one token of text")
    if max(max(e) for e in encoded) >= model.config.vocab_size:
        raise ValueError(f"the model's vocab ({model.config.vocab_size}) is smaller than the GPT-2 tokenizer's")
    device = next(model.parameters()).device
    longest = max(len(e) for e in encoded)
    max_new_tokens = min(max_new_tokens, model.config.block_size - longest)
    if max_new_tokens <= 0:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room in the model's context ({model.config.block_size})"
        )
    idx = torch.full((len(prompts), longest), GPT2_EOS_ID, dtype=torch.long, device=device)
    for i, e in enumerate(encoded):
        idx[i, longest - len(e) :] = torch.tensor(e, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = GPT2_EOS_ID if model.config.vocab_size > GPT2_EOS_ID else None
    out = generate(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos,
        prompt_lengths=[len(e) for e in encoded],
        use_cache=use_cache,
        generator=generator,
    )
    texts = []
    for row in out[:, longest:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tok.decode(row))
    return texts
