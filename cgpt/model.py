"""The Cerebras-GPT decoder in pure PyTorch (the same network as Hugging Face ``GPT2LMHeadModel``).

Reads top-down: attention, MLP, block, GPT. Parameter names follow GPT-2 (``transformer.h.0.attn.c_attn``)
so that checkpoints convert by renaming alone (plus GPT-2's Conv1D transpose).
muP is a switch in :class:`cgpt.config.ModelConfig`, not a separate model: it changes the init
stds, the attention scale, and two multipliers (embedding output, output logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cgpt.config import ModelConfig
from cgpt.hardware import default_fused_loss
from cgpt.lm_head import IGNORE_INDEX, LMHead

# Truncated-normal init is cut at +-2 std (ModelZoo: a = -2 std, b = 2 std in every initializer).
INIT_TRUNCATION_STDS = 2.0


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer for incremental decoding."""

    def __init__(self, batch: int, n_head: int, max_len: int, d_head: int, device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch, n_head, max_len, d_head)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, nh, t, hd) at positions ``start..start+t`` and return all keys/values so far."""
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.d_head = config.d_head
        self.scale = config.attn_scale
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=True)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hd)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)
        if attn_mask is None and k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif attn_mask is None and T == 1:
            # One new query at the end of the cache sees every cached key: no mask to build.
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # Decoding with a cache, or rows with padding: an explicit boolean mask (True = attend).
            if attn_mask is None:
                attn_mask = _causal_mask(T, k.size(2), start, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        # (B, nh, T, hd) -> (B, T, C)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def _causal_mask(t_q: int, t_k: int, start: int, device: torch.device) -> torch.Tensor:
    """(t_q, t_k) boolean mask: query i (absolute position start+i) sees keys 0..start+i."""
    q_pos = torch.arange(start, start + t_q, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return k_pos <= q_pos


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ffn, bias=True)
        self.c_proj = nn.Linear(config.d_ffn, config.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact erf GELU, as Cerebras-GPT's HF config says ("gelu", not "gelu_new").
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Cerebras-GPT: ``GPT(config)(idx)`` maps token ids (B, T) to logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.d_model),
                "wpe": nn.Embedding(config.block_size, config.d_model),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.d_model, eps=config.layer_norm_eps),
            }
        )
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.kv_caches: list[KVCache] | None = None
        # How the loss is computed: True = the fused chunked head (cgpt.lm_head), False = from the
        # full logits, "auto" = where cgpt.hardware.default_fused_loss says it is faster (CPUs).
        self.fused_loss: bool | str = "auto"
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Cerebras-GPT init: truncated normal at +-2 std, biases zero, LayerNorm weight one.

        Embeddings use ``embedding_init_std``, hidden weights ``hidden_init_std``, and the two
        residual output projections of every block ``residual_init_std`` (see ModelConfig).
        """
        c = self.config
        for name, p in self.named_parameters():
            if ".lora_" in name:
                continue  # LoRA adapters (cgpt.lora) initialise themselves
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif name.startswith(("transformer.wte", "transformer.wpe")):
                _trunc_normal_(p, c.embedding_init_std)
            elif name.endswith("c_proj.weight"):
                _trunc_normal_(p, c.residual_init_std)
            else:
                _trunc_normal_(p, c.hidden_init_std)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        start: int = 0,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); with ``targets`` (B, T), the loss instead.

        ``start`` is the absolute position of ``idx[:, 0]`` when decoding with the KV caches set
        up by :meth:`setup_kv_cache`. ``attn_mask`` (B, 1, T, T_total) of booleans and
        ``position_ids`` (B, T) serve batches of left-padded prompts. ``last_only`` returns the
        logits of the last position only, (B, 1, vocab): decoding needs no more, and the LM head
        over a whole prompt costs as much as several decode steps. ``targets`` returns the mean
        cross entropy over targets other than ``ignore_index`` (see :meth:`loss`); it is computed
        inside this call so that sharding strategies see the head's weight in use.
        """
        B, T = idx.shape
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, C)
        if self.config.mup:
            x = x * self.config.embedding_multiplier
        caches = self.kv_caches
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches is not None else None, start, attn_mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        scale = self.config.logits_multiplier if self.config.mup else 1.0
        if targets is None:
            return self.lm_head(x, scale=scale)
        fused = self.fused_loss
        if fused == "auto":
            fused = default_fused_loss(x.device)
        return self.lm_head(x, targets, scale=scale, ignore_index=ignore_index, fused=bool(fused))

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, **kwargs: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross entropy over the targets other than ``ignore_index`` (softmax in
        fp32). ``kwargs`` go to :meth:`forward` (``attn_mask``, ``position_ids``)."""
        return self(idx, targets=targets, ignore_index=ignore_index, **kwargs)

    # --- decoding support --------------------------------------------------------------------
    def setup_kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate per-layer KV caches for ``batch`` rows of up to ``max_len`` positions."""
        max_len = max_len or self.config.block_size
        p = self.transformer.wte.weight
        self.kv_caches = [
            KVCache(batch, self.config.n_head, max_len, self.config.d_head, p.device, dtype or p.dtype)
            for _ in range(self.config.n_layer)
        ]

    def clear_kv_cache(self) -> None:
        self.kv_caches = None

    def num_params(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def _trunc_normal_(p: torch.Tensor, std: float) -> None:
    bound = INIT_TRUNCATION_STDS * std
    nn.init.trunc_normal_(p, mean=0.0, std=std, a=-bound, b=bound)
