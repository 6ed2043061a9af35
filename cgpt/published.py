"""The published Cerebras-GPT configurations, as data: what :mod:`cgpt.certificate` checks the presets
against.

Sources:

- ``ModelZoo <file>``: the configs of the public ``Cerebras/modelzoo`` repository,
  ``src/cerebras/modelzoo/models/nlp/gpt3/configs/Cerebras_GPT/<file>`` (releases 2.1 to 2.10;
  ``modelzoo/transformers/pytorch/gpt3/configs/Cerebras_GPT/`` in 1.9 and 2.0). Values are copied as
  the yaml writes them; where a value is derived (muP init stds and multipliers, the decay shape)
  the expression says how, with ModelZoo's own formula from
  ``src/cerebras/modelzoo/models/nlp/gpt2/gpt2_model.py`` (muP) or the scheduler's class name.
- ``paper``: Dey et al. 2023, "Cerebras-GPT" (arXiv 2304.03208): the muP per-size init stds,
  published rounded (compared within half a unit of their last digit).
- ``HF``: the ``config.json`` of ``cerebras/Cerebras-GPT-*`` on Hugging Face.

Where the sources disagree, :data:`DISAGREEMENTS` says which one cgpt follows and why.
"""

from __future__ import annotations

from typing import Any

MZ = "ModelZoo Cerebras_GPT/"
MUP_BASE_HIDDEN = 256  # mup_base_hidden_size of every *_mup.yaml (mup_base_filter_size 1024 = 4 x)
MUP_SIGMA = 0.08  # std of every initializer in the *_mup.yaml files (scaled by gpt2_model.py)

# Shared by every yaml: the architecture and optimizer keys that do not vary with size.
_COMMON: dict[str, Any] = {
    "vocab_size": 50257,
    "block_size": 2048,  # max_position_embeddings
    "layer_norm_eps": 1.0e-5,
    "init_truncation_stds": 2.0,  # initializer a = -2 std, b = 2 std
    "adam_betas": (0.9, 0.95),
    "weight_decay": 0.1,
    "max_gradient_norm": 1.0,
}


def _sp(file: str, shape: tuple[int, int, int, int], output_std: float, lr: float, eps: float,
        warmup: int, decay: str, decay_steps: int, max_steps: int, batch: int) -> dict[str, Any]:  # fmt: skip
    n_layer, d_model, n_head, d_ffn = shape
    return {
        "source": MZ + file,
        **_COMMON,
        "n_layer": n_layer,
        "d_model": d_model,
        "n_head": n_head,
        "d_ffn": d_ffn,
        "embedding_init_std": 0.02,
        "hidden_init_std": 0.02,
        "output_init_std": output_std,
        "adam_eps": eps,
        "peak_lr": lr,
        "warmup_steps": warmup,
        "decay": decay,  # LinearLR -> linear, CosineDecayLR -> cosine (the second scheduler)
        "decay_steps": decay_steps,  # the second scheduler's total_iters
        "end_lr": lr / 10,  # its end_learning_rate
        "max_steps": max_steps,
        "batch_size": batch,
    }


def _mup(file: str, sp: dict[str, Any]) -> dict[str, Any]:
    """A *_mup.yaml: the SP shape and schedule lengths, every initializer std 0.08, muP keys."""
    m_w = sp["d_model"] / MUP_BASE_HIDDEN  # gpt2_model.py: hidden_size_width_mult
    return {
        **sp,
        "source": MZ + file,
        "embedding_init_std": MUP_SIGMA,  # embedding_initializer: not scaled
        "hidden_init_std": MUP_SIGMA * m_w**-0.5,  # scale_initializers_by_dimension(width_scale=m_w**-0.5)
        "output_init_std": MUP_SIGMA * m_w**-0.5 * (2 * sp["n_layer"]) ** -0.5,  # ... depth_scale=(2L)**-0.5
        "peak_lr": 6.0e-3,
        "end_lr": 6.0e-4,
        "mup_width_mult": m_w,
        "embedding_multiplier": 10.0,  # embeddings_scale
        "logits_multiplier": 1.0 / m_w,  # output_logits_alpha 1.0 / m_w (scale_output_logits_by_d: True)
        "attn_scale": 1.0 / (sp["d_model"] // sp["n_head"]),  # scale_qk_dot_by_d: true -> 1/d_head
        "hidden_lr_scale": 1.0 / m_w,  # lr_adjustment_groups decoder_attention, *_ffn: 1 / m_w
    }


PUBLISHED: dict[str, dict[str, Any]] = {
    "cerebras-gpt-111m": _sp(
        "111m.yaml", (10, 768, 12, 3072), 0.004472135954999579, 6.0e-4, 1.0e-8, 1525, "linear", 7512, 9037, 120
    ),  # fmt: skip
    "cerebras-gpt-256m": _sp(
        "256m.yaml", (14, 1088, 17, 4352), 0.003779644730092272, 6.0e-4, 1.0e-8, 693, "linear", 8775, 9468, 264
    ),  # fmt: skip
    "cerebras-gpt-590m": _sp(
        "590m.yaml", (18, 1536, 12, 6144), 0.0033333333333333335, 2.0e-4, 1.0e-8, 693, "linear", 21143, 21836, 264
    ),  # fmt: skip
    "cerebras-gpt-1.3b": _sp(
        "1p3b.yaml", (24, 2048, 16, 8192), 0.0025, 2.0e-4, 1.0e-8, 346, "cosine", 23988, 24334, 528
    ),  # fmt: skip
    "cerebras-gpt-2.7b": _sp(
        "2p7b.yaml", (32, 2560, 32, 10240), 0.0025, 2.0e-4, 1.0e-8, 346, "cosine", 48695, 49041, 528
    ),  # fmt: skip
    "cerebras-gpt-6.7b": _sp(
        "6p7b.yaml", (32, 4096, 32, 16384), 0.0025, 1.2e-4, 1.0e-9, 176, "linear", 62346, 62522, 1040
    ),  # fmt: skip
    # Phase 1 of two: the cosine (174,081 steps) is three times the run (57,000 steps).
    "cerebras-gpt-13b": _sp(
        "13b_bs720.yaml", (40, 5120, 40, 20480), 0.0025, 1.2e-4, 1.0e-9, 254, "cosine", 174081, 57000, 720
    ),  # fmt: skip
}
for _size, _file in (("111m", "111m"), ("256m", "256m"), ("590m", "590m"), ("1.3b", "1p3b"), ("2.7b", "2p7b")):
    PUBLISHED[f"cerebras-gpt-{_size}-mup"] = _mup(f"{_file}_mup.yaml", PUBLISHED[f"cerebras-gpt-{_size}"])

# The 13B's phase 2 (ModelZoo 13b_bs1080.yaml and the Cerebras_GPT README): the phase-1 checkpoint's
# global step reset to 38,000 (= 57,000 x 720 / 1080), then trained on to step 116,223.
PUBLISHED_CONTINUATIONS: dict[str, dict[str, Any]] = {
    "cerebras-gpt-13b": {
        "source": MZ + "13b_bs1080.yaml + README.md",
        "batch_size": 1080,
        "resume_step": 57000,
        "schedule_step": 38000,
        "warmup_steps": 169,
        "decay": "cosine",
        "decay_steps": 116054,
        "schedule_end": 116223,  # max_steps
        "peak_lr": 1.2e-4,
        "end_lr": 1.2e-5,
        "adam_eps": 1.0e-9,
    },
}

# The paper's muP per-size init stds (hidden, output), rounded as published: compared within half a
# unit of the last digit printed.
PAPER_MUP_STDS: dict[str, tuple[float, float]] = {
    "cerebras-gpt-111m-mup": (0.04619, 0.010328),
    "cerebras-gpt-256m-mup": (0.03881, 0.007334),
    "cerebras-gpt-590m-mup": (0.03266, 0.005443),
    "cerebras-gpt-1.3b-mup": (0.02828, 0.004082),
    "cerebras-gpt-2.7b-mup": (0.02530, 0.003162),
}
PAPER_MUP_TOLERANCE = (5e-6, 5e-7)  # absolute: half a unit of the 5th / 6th decimal printed

# Where the public sources disagree: (what, the sources, what cgpt follows and why).
DISAGREEMENTS: list[tuple[str, str, str]] = [
    (
        "muP init",
        "ModelZoo 1.9 *_mup.yaml: the SP initializers (std 0.02, output 0.02/sqrt(2L)), logits x 1/m_w "
        "and a decoder_kernel lr of 1/m_w; ModelZoo 2.x: every initializer 0.08, scaled by "
        "m_w**-0.5 (and (2L)**-0.5 for the output projections) in gpt2_model.py",
        "2.x: it is what the paper describes (sigma_base 0.08) and gives its per-size stds",
    ),
    (
        "decay shape",
        "README: 'learning rate ... 10x cosine decayed' for every size; the yamls: LinearLR for 111M, "
        "256M, 590M and 6.7B, CosineDecayLR for 1.3B, 2.7B and 13B",
        "the yamls: they are the configs that were run, and the reference table agrees",
    ),
    (
        "2.7B heads",
        "README table: 20 heads; 2p7b.yaml and the HF config.json: 32 (d_head 80)",
        "32: the yaml and the published checkpoint",
    ),
    (
        "warmup",
        "README: 'warmed up for 375M tokens (1500 steps for 111M and 256M models)'; yamls: 1525 (111M), 693 (256M)",
        "the yamls",
    ),
    (
        "13B steps and FLOPs",
        "README training table: 174,335 steps at batch 720 and 2.1E+22 FLOPs; README evaluation table "
        "and paper: 2.3E+22; the yamls: 57,000 steps at 720, then 78,223 at 1080 (174,335 = 254 + "
        "174,081 is the phase-1 schedule's length, not steps run)",
        "the yamls for steps and schedule; the paper's 2.3e22 for FLOPs (cgpt's convention gives 2.28e22)",
    ),
]
