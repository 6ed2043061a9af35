"""Typed, validated descriptions of a Cerebras-GPT model and its published training recipe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from cgpt.presets import MUP_BASE_INIT_STD, MUP_BASE_WIDTH, MUP_EMBEDDING_MULTIPLIER, PRESETS

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what to change."""


@dataclass
class ModelConfig:
    """Architecture of a GPT-2 style Cerebras-GPT decoder.

    Fields:
        n_layer: number of transformer blocks.
        d_model: residual stream width.
        n_head: attention heads; must divide ``d_model``.
        d_ffn: MLP hidden width (0 means ``4 * d_model``).
        vocab_size: token vocabulary (GPT-2 BPE: 50257).
        block_size: maximum context length; learned position embeddings of this many rows.
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: std of the truncated-normal init of embeddings and hidden weights (SP).
        output_init_std: std of the two residual output projections; ``None`` means
            ``init_std / sqrt(2 * n_layer)`` (the published per-size values are in the presets).
        mup: switch on the maximal-update parametrization (Cerebras-GPT-muP).
        mup_base_width: proxy-model width that muP hyperparameters were tuned at.
        mup_base_init_std: sigma_base of muP.
        mup_embedding_multiplier: constant multiplying the embedding output under muP.
        name: preset name, informational.
    """

    n_layer: int
    d_model: int
    n_head: int
    d_ffn: int = 0
    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 2048
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    output_init_std: float | None = None
    mup: bool = False
    mup_base_width: int = MUP_BASE_WIDTH
    mup_base_init_std: float = MUP_BASE_INIT_STD
    mup_embedding_multiplier: float = MUP_EMBEDDING_MULTIPLIER
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("n_layer", "d_model", "n_head", "vocab_size", "block_size", "mup_base_width"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{key} must be a positive integer, got {value!r}")
        if self.d_ffn == 0:
            self.d_ffn = 4 * self.d_model
        if not isinstance(self.d_ffn, int) or self.d_ffn <= 0:
            raise ConfigError(f"ModelConfig.d_ffn must be a positive integer, got {self.d_ffn!r}")
        if self.d_model % self.n_head != 0:
            raise ConfigError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "choose n_head so that d_model / n_head is an integer head size"
            )
        for key in ("layer_norm_eps", "init_std", "mup_base_init_std", "mup_embedding_multiplier"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"ModelConfig.{key} must be > 0, got {getattr(self, key)!r}")
        if self.output_init_std is not None and not self.output_init_std > 0:
            raise ConfigError(f"ModelConfig.output_init_std must be > 0 or None, got {self.output_init_std!r}")

    # --- derived quantities -------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def width_mult(self) -> float:
        """muP width multiplier m_w = d_model / d_base (1 under SP)."""
        return self.d_model / self.mup_base_width if self.mup else 1.0

    @property
    def embedding_init_std(self) -> float:
        return self.mup_base_init_std if self.mup else self.init_std

    @property
    def hidden_init_std(self) -> float:
        return self.mup_base_init_std / math.sqrt(self.width_mult) if self.mup else self.init_std

    @property
    def residual_init_std(self) -> float:
        """Std of the attention-output and MLP-output projections."""
        if self.mup:
            return self.mup_base_init_std / math.sqrt(2 * self.width_mult * self.n_layer)
        if self.output_init_std is not None:
            return self.output_init_std
        return self.init_std / math.sqrt(2 * self.n_layer)

    @property
    def attn_scale(self) -> float:
        """Attention-score scale: 1/sqrt(d_head) under SP, 1/d_head under muP."""
        return 1.0 / self.d_head if self.mup else 1.0 / math.sqrt(self.d_head)

    @property
    def embedding_multiplier(self) -> float:
        return self.mup_embedding_multiplier if self.mup else 1.0

    @property
    def logits_multiplier(self) -> float:
        return 1.0 / self.width_mult

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count (tied token embedding and head counted once)."""
        d, f = self.d_model, self.d_ffn
        per_block = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (d * f + f) + (f * d + d)
        total = self.n_layer * per_block + 2 * d  # final LayerNorm
        if include_embeddings:
            total += self.vocab_size * d + self.block_size * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * non-embedding-position params + attention (PaLM appendix B)."""
        t = seq_len or self.block_size
        n = self.num_params() - self.block_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * t

    # --- presets and serialisation -----------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset (e.g. ``cerebras-gpt-111m``), optionally overriding fields."""
        key = normalize_preset_name(name)
        return cls(**{**PRESETS[key]["model"], "name": key, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; a ``name`` that is a preset supplies defaults for missing keys."""
        data = dict(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig keys {sorted(unknown)}; valid keys: {[f.name for f in fields(cls)]}"
            )
        name = data.get("name")
        if name and normalize_preset_name(name, strict=False) in PRESETS:
            return cls.from_name(name, **{k: v for k, v in data.items() if k != "name"})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingDefaults:
    """The published training recipe that goes with a preset.

    Fields:
        lr: peak learning rate (the muP base lr for muP presets).
        batch_size: global batch in sequences.
        warmup_steps: linear warmup length.
        decay: ``linear`` or ``cosine`` decay after warmup.
        max_steps: total optimizer steps.
        decay_steps: length of the decay after warmup; ``None``: to ``max_steps`` (every published
            run but the 13B, whose phase-1 cosine is 174,081 steps long and stops at 57,000).
        adam_eps: AdamW epsilon.
        final_lr_ratio: the lr at the last step as a fraction of the peak (Cerebras-GPT: 0.1).
    """

    lr: float
    batch_size: int
    warmup_steps: int
    decay: Literal["linear", "cosine"]
    max_steps: int
    decay_steps: int | None = None
    adam_eps: float = 1e-8
    final_lr_ratio: float = 0.1
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    weight_decay: float = 0.1

    @classmethod
    def from_name(cls, name: str) -> TrainingDefaults:
        return cls(**PRESETS[normalize_preset_name(name)]["train"])


def normalize_preset_name(name: str, strict: bool = True) -> str:
    """Accept ``cerebras-gpt-111m``, ``cerebras_gpt_111m`` or ``111m``; return the table key."""
    key = name.strip().lower().replace("_", "-")
    if not key.startswith("cerebras-gpt-"):
        key = "cerebras-gpt-" + key
    # Hydra file names cannot hold a dot comfortably: accept 1p3b for 1.3b.
    key = key.replace("1p3b", "1.3b").replace("2p7b", "2.7b").replace("6p7b", "6.7b")
    if strict and key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return key


def preset_names() -> list[str]:
    return sorted(PRESETS)
