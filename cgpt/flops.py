"""Training FLOPs of a model under three conventions (pure functions, no torch).

``"palm"`` is what MFU is measured against (:meth:`cgpt.config.ModelConfig.flops_per_token`:
6 x parameters without position embeddings plus 12 x n_layer x d_model x seq_len for attention).
``"cerebras"`` reproduces the training FLOPs the Cerebras-GPT paper publishes (within 9% for all
seven sizes): every weight matrix counted as a matmul, the tied embedding twice (input lookup and
LM head, as Chinchilla's appendix F does), and attention scores plus the weighted sum over the
full, unmasked window counted at 24 x n_layer x d_model x seq_len per token. The paper does not
spell out its convention; this one is the simplest that matches its table (see
``docs/design/flop-conventions.md``). ``"6nd"`` is 6 x all parameters.
"""

from __future__ import annotations

from typing import Literal

from cgpt.config import ConfigError, ModelConfig, TrainingDefaults, normalize_preset_name
from cgpt.presets import CONTINUATIONS

TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal data size per parameter
FlopConvention = Literal["palm", "cerebras", "6nd"]
FLOP_CONVENTIONS = ("palm", "cerebras", "6nd")


def flops_per_token(config: ModelConfig, seq_len: int | None = None, convention: FlopConvention = "palm") -> float:
    """Training (forward + backward) FLOPs per token under ``convention`` (see module docstring)."""
    t = seq_len or config.block_size
    n_no_pos = config.num_params() - config.block_size * config.d_model
    if convention == "palm":
        return config.flops_per_token(t)
    if convention == "6nd":
        return 6.0 * config.num_params()
    if convention == "cerebras":
        lm_head = 6.0 * config.vocab_size * config.d_model  # the tied matrix used a second time
        return 6.0 * n_no_pos + lm_head + 24.0 * config.n_layer * config.d_model * t
    raise ConfigError(f"unknown FLOP convention {convention!r}; choose one of {FLOP_CONVENTIONS}")


def training_flops(
    config: ModelConfig, tokens: float, seq_len: int | None = None, convention: FlopConvention = "cerebras"
) -> float:
    """Total training FLOPs for ``tokens`` tokens."""
    return flops_per_token(config, seq_len, convention) * tokens


def published_tokens(preset: str) -> float:
    """Tokens the published run of ``preset`` trained on: batch x steps x 2048, summed over its
    phases (the 13B: 57,000 steps at batch 720, then 78,223 at batch 1080; 2.57e11)."""
    return sum(p["tokens"] for p in published_phases(preset))


def published_phases(preset: str) -> list[dict[str, float]]:
    """Each phase of the published run of ``preset``: ``batch_size``, ``steps`` and ``tokens``
    (one phase for every preset but the 13B; :data:`cgpt.presets.CONTINUATIONS` has the rest)."""
    key = normalize_preset_name(preset)
    t = TrainingDefaults.from_name(key)
    seq = ModelConfig.from_name(key).block_size
    phases = [{"batch_size": t.batch_size, "steps": t.max_steps, "tokens": float(t.batch_size * t.max_steps * seq)}]
    for c in CONTINUATIONS.get(key, ()):
        steps = c["schedule_end"] - c["schedule_step"]
        phases.append({"batch_size": c["batch_size"], "steps": steps, "tokens": float(c["batch_size"] * steps * seq)})
    return phases


def compute_optimal_tokens(config: ModelConfig, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Chinchilla's compute-optimal data size: ``tokens_per_param`` x parameters."""
    return tokens_per_param * config.num_params()
