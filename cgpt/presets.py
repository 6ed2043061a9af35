"""The Cerebras-GPT preset table: published shapes and training recipes, kept apart from logic.

Sources: Dey et al. 2023 (arXiv 2304.03208), the Cerebras modelzoo configs and the published
Hugging Face ``config.json`` files of ``cerebras/Cerebras-GPT-*``.
Each row gives the architecture (keys of :class:`cgpt.config.ModelConfig`) under ``model`` and the
published recipe (keys of :class:`cgpt.config.TrainingDefaults`) under ``train``.
"""

from __future__ import annotations

import math
from typing import Any

# muP (Cerebras-GPT-muP): base width 256, eta_base 6e-3, sigma_base 0.08, embedding multiplier 10.
MUP_BASE_WIDTH = 256
MUP_BASE_LR = 6e-3
MUP_BASE_INIT_STD = 0.08
MUP_EMBEDDING_MULTIPLIER = 10.0

PRESETS: dict[str, dict[str, Any]] = {
    # --- the published family (standard parametrization) -------------------------------------
    "cerebras-gpt-111m": {
        "model": {
            "n_layer": 10,
            "d_model": 768,
            "n_head": 12,
            "d_ffn": 3072,
            "output_init_std": 0.02 / math.sqrt(2 * 10),  # exact: ModelZoo's yaml has 17 digits
        },
        "train": {
            "lr": 6.0e-4,
            "batch_size": 120,
            "warmup_steps": 1525,
            "decay": "linear",
            "max_steps": 9037,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-256m": {
        "model": {
            "n_layer": 14,
            "d_model": 1088,
            "n_head": 17,
            "d_ffn": 4352,
            "output_init_std": 0.02 / math.sqrt(2 * 14),  # exact: ModelZoo's yaml has 17 digits
        },
        "train": {
            "lr": 6.0e-4,
            "batch_size": 264,
            "warmup_steps": 693,
            "decay": "linear",
            "max_steps": 9468,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-590m": {
        "model": {
            "n_layer": 18,
            "d_model": 1536,
            "n_head": 12,
            "d_ffn": 6144,
            "output_init_std": 0.02 / math.sqrt(2 * 18),  # exact: ModelZoo's yaml has 17 digits
        },
        "train": {
            "lr": 2.0e-4,
            "batch_size": 264,
            "warmup_steps": 693,
            "decay": "linear",
            "max_steps": 21836,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-1.3b": {
        "model": {"n_layer": 24, "d_model": 2048, "n_head": 16, "d_ffn": 8192, "output_init_std": 0.0025},
        "train": {
            "lr": 2.0e-4,
            "batch_size": 528,
            "warmup_steps": 346,
            "decay": "cosine",
            "max_steps": 24334,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-2.7b": {
        # 32 heads of 80 (the modelzoo README's "20 heads" is a typo; config and HF say 32).
        "model": {"n_layer": 32, "d_model": 2560, "n_head": 32, "d_ffn": 10240, "output_init_std": 0.0025},
        "train": {
            "lr": 2.0e-4,
            "batch_size": 528,
            "warmup_steps": 346,
            "decay": "cosine",
            "max_steps": 49041,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-6.7b": {
        "model": {"n_layer": 32, "d_model": 4096, "n_head": 32, "d_ffn": 16384, "output_init_std": 0.0025},
        "train": {
            "lr": 1.2e-4,
            "batch_size": 1040,
            "warmup_steps": 176,
            "decay": "linear",
            "max_steps": 62522,
            "adam_eps": 1e-9,
        },
    },
    "cerebras-gpt-13b": {
        # Published run in two phases (ModelZoo 13b_bs720.yaml, then 13b_bs1080.yaml). The preset is
        # phase 1: 57,000 steps at batch 720 whose cosine is 174,081 steps long, so it ends at 0.78x
        # peak. Phase 2 (CONTINUATIONS below) is a resume: docs/pretraining.md#the-13b-run-in-two-phases.
        "model": {"n_layer": 40, "d_model": 5120, "n_head": 40, "d_ffn": 20480, "output_init_std": 0.0025},
        "train": {
            "lr": 1.2e-4,
            "batch_size": 720,
            "warmup_steps": 254,
            "decay": "cosine",
            "max_steps": 57000,
            "decay_steps": 174081,
            "adam_eps": 1e-9,
        },
    },
    # --- small shapes for CPU work: same architecture, short context ---------------------------
    "cerebras-gpt-tiny": {
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "d_ffn": 256, "block_size": 128},
        "train": {
            "lr": 1.0e-3,
            "batch_size": 8,
            "warmup_steps": 10,
            "decay": "linear",
            "max_steps": 100,
            "adam_eps": 1e-8,
        },
    },
    "cerebras-gpt-demo": {
        "model": {"n_layer": 4, "d_model": 128, "n_head": 4, "d_ffn": 512, "block_size": 128},
        "train": {
            "lr": 3.0e-3,
            "batch_size": 16,
            "warmup_steps": 20,
            "decay": "linear",
            "max_steps": 560,
            "adam_eps": 1e-8,
        },
    },
}

# Runs published in more than one phase: the later phases, each a resume of the previous one with
# a new global batch and the schedule re-based. ModelZoo reset the global step of the 13B phase-1
# checkpoint to 38,000 (= 57,000 x 720 / 1080: the same tokens at the new batch) and trained on with
# a 169-step warmup (already passed) and a 116,054-step cosine to step 116,223. 116,054 x 1080 =
# 174,081 x 720, so both phases follow one cosine in tokens.
CONTINUATIONS: dict[str, list[dict[str, Any]]] = {
    "cerebras-gpt-13b": [
        {
            "batch_size": 1080,
            "resume_step": 57000,  # the phase-1 checkpoint's global step
            "schedule_step": 38000,  # where the schedule stands at that step
            "warmup_steps": 169,
            "decay_steps": 116054,
            "schedule_end": 116223,  # ModelZoo's max_steps: 78,223 more steps
        }
    ],
}

# muP variants of the published sizes 111M ... 2.7B: the same shapes with muP switched on and the
# muP recipe (eta_base 6e-3 for all sizes; decays to 6e-4 like SP).
for _size in ("111m", "256m", "590m", "1.3b", "2.7b"):
    _sp = PRESETS[f"cerebras-gpt-{_size}"]
    _model = {k: v for k, v in _sp["model"].items() if k != "output_init_std"}
    PRESETS[f"cerebras-gpt-{_size}-mup"] = {
        "model": {**_model, "mup": True},
        "train": {**_sp["train"], "lr": MUP_BASE_LR},
    }
for _size in ("tiny", "demo"):
    PRESETS[f"cerebras-gpt-{_size}-mup"] = {
        "model": {**PRESETS[f"cerebras-gpt-{_size}"]["model"], "mup": True},
        "train": {**PRESETS[f"cerebras-gpt-{_size}"]["train"], "lr": MUP_BASE_LR},
    }

# Published Pile test losses (Dey et al. 2023), for evaluation reports and scaling fits.
PUBLISHED_PILE_LOSS: dict[str, float] = {
    "cerebras-gpt-111m": 2.608,
    "cerebras-gpt-256m": 2.349,
    "cerebras-gpt-590m": 2.181,
    "cerebras-gpt-1.3b": 1.997,
    "cerebras-gpt-2.7b": 1.834,
    "cerebras-gpt-6.7b": 1.704,
    "cerebras-gpt-13b": 1.572,
    "cerebras-gpt-111m-mup": 2.588,
    "cerebras-gpt-256m-mup": 2.359,
    "cerebras-gpt-590m-mup": 2.155,
    "cerebras-gpt-1.3b-mup": 1.984,
    "cerebras-gpt-2.7b-mup": 1.846,
}

# Published training compute in FLOPs (SP family), for the scaling-law fit.
PUBLISHED_TRAIN_FLOPS: dict[str, float] = {
    "cerebras-gpt-111m": 2.6e18,
    "cerebras-gpt-256m": 1.3e19,
    "cerebras-gpt-590m": 6.1e19,
    "cerebras-gpt-1.3b": 2.8e20,
    "cerebras-gpt-2.7b": 1.1e21,
    "cerebras-gpt-6.7b": 6.3e21,
    "cerebras-gpt-13b": 2.3e22,
}
