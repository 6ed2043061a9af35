"""Optimizer groups (decay only on matrices and embeddings; muP lr scales) and the schedule."""

from __future__ import annotations

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.model import GPT
from cgpt.optim import OptimConfig, build_optimizer, build_scheduler, lr_multiplier, param_groups


def test_weight_decay_only_on_matrices_and_embeddings() -> None:
    model = GPT(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=500, block_size=16))
    groups = param_groups(model, weight_decay=0.1)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.h.1.mlp.c_proj.weight" in decayed
    assert all(n.endswith("bias") or ".ln_" in n or "ln_f" in n for n in plain)
    assert "transformer.h.0.ln_1.weight" in plain and "transformer.h.0.attn.c_attn.bias" in plain
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_all  # tied head counted once


def test_mup_hidden_matrices_get_lr_over_width_mult() -> None:
    cfg = ModelConfig(n_layer=2, d_model=512, n_head=8, vocab_size=500, block_size=16, mup=True)
    model = GPT(cfg)
    opt = build_optimizer(model, 6e-3, OptimConfig(), eps=1e-8, width_mult=cfg.width_mult)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["transformer.h.0.attn.c_attn.weight"])]["lr"] == pytest.approx(6e-3 / 2)
    assert by_param[id(named["transformer.h.1.mlp.c_proj.weight"])]["lr"] == pytest.approx(6e-3 / 2)
    assert by_param[id(named["transformer.wte.weight"])]["lr"] == pytest.approx(6e-3)
    assert by_param[id(named["transformer.h.0.attn.c_attn.bias"])]["lr"] == pytest.approx(6e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "step, decay, expected",
    [
        (0, "linear", 0.0),
        (50, "linear", 0.5),
        (100, "linear", 1.0),
        (550, "linear", 0.55),
        (1000, "linear", 0.1),
        (5000, "linear", 0.1),
        (550, "cosine", 0.55),
        (325, "cosine", 0.1 + 0.9 * 0.5 * (1 + 2**-0.5)),
        (1000, "cosine", 0.1),
    ],
)
def test_lr_multiplier_at_chosen_steps(step: int, decay: str, expected: float) -> None:
    assert lr_multiplier(step, 100, 1000, decay, 0.1) == pytest.approx(expected)


def test_scheduler_drives_every_group_and_rejects_unknown_decay() -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    sched = build_scheduler(opt, warmup_steps=10, max_steps=20, decay="linear", final_lr_ratio=0.1)
    for _ in range(15):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.275)
    with pytest.raises(ValueError, match="linear"):
        build_scheduler(opt, 1, 10, "exponential", 0.1)
