"""muP: the published per-size values, init stds, lr scales, forward multipliers and the coordinate check."""

from __future__ import annotations

import math

import pytest
import torch

from cgpt.config import ModelConfig, TrainingDefaults
from cgpt.model import GPT
from cgpt.mup import coord_check
from cgpt.optim import param_groups

# Reference doc, "muP variants": m_w, hidden std, output std, Pile loss table order 111M ... 2.7B.
PUBLISHED = {
    "cerebras-gpt-111m-mup": (3.0, 0.04619, 0.010328),
    "cerebras-gpt-256m-mup": (4.25, 0.03881, 0.007334),
    "cerebras-gpt-590m-mup": (6.0, 0.03266, 0.005443),
    "cerebras-gpt-1.3b-mup": (8.0, 0.02828, 0.004082),
    "cerebras-gpt-2.7b-mup": (10.0, 0.02530, 0.003162),
}
HIDDEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_mup_preset_matches_published_values(name: str) -> None:
    m_w, hidden_std, output_std = PUBLISHED[name]
    c = ModelConfig.from_name(name)
    sp = ModelConfig.from_name(name.removesuffix("-mup"))
    assert c.mup and (c.n_layer, c.d_model, c.n_head, c.d_ffn) == (sp.n_layer, sp.d_model, sp.n_head, sp.d_ffn)
    assert c.width_mult == pytest.approx(m_w)
    assert c.embedding_init_std == pytest.approx(0.08)
    assert c.hidden_init_std == pytest.approx(hidden_std, abs=5e-6)
    assert c.residual_init_std == pytest.approx(output_std, abs=5e-7)
    assert c.embedding_multiplier == 10.0
    assert c.logits_multiplier == pytest.approx(1 / m_w)
    assert c.attn_scale == pytest.approx(1 / c.d_head)
    recipe = TrainingDefaults.from_name(name)
    assert recipe.lr == 6e-3 and recipe.lr * recipe.final_lr_ratio == pytest.approx(6e-4)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_mup_lr_scales(name: str) -> None:
    """Hidden matrices get eta / m_w; embeddings (tied head), biases and LayerNorms keep eta."""
    config = ModelConfig.from_name(name, n_layer=1, vocab_size=64, block_size=8)  # full width, cheap
    with torch.device("meta"):
        model = GPT(config)
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.1, config.width_mult) for n in g["names"]}
    assert set(scales) == {n for n, _ in model.named_parameters()}
    for n, scale in scales.items():
        expected = 1 / PUBLISHED[name][0] if n.endswith(HIDDEN) else 1.0
        assert scale == pytest.approx(expected), n


def test_sp_has_no_mup_scaling() -> None:
    c = ModelConfig.from_name("cerebras-gpt-111m")
    assert (c.width_mult, c.embedding_multiplier, c.logits_multiplier) == (1.0, 1.0, 1.0)
    assert c.attn_scale == pytest.approx(1 / math.sqrt(64))
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=1, d_model=64, n_head=4, vocab_size=64, block_size=8))
    assert {g["lr_scale"] for g in param_groups(model, 0.1, 1.0)} == {1.0}


def test_mup_init_stds_are_applied() -> None:
    """Measured stds of a muP model's weights (truncated at 2 sigma: std = 0.8796 sigma)."""
    config = ModelConfig(n_layer=2, d_model=512, n_head=8, vocab_size=512, block_size=64, mup=True)
    torch.manual_seed(0)
    model = GPT(config)
    trunc = 0.8796
    m_w = 2.0
    checks = {
        "transformer.wte.weight": 0.08,
        "transformer.wpe.weight": 0.08,
        "transformer.h.0.attn.c_attn.weight": 0.08 / math.sqrt(m_w),
        "transformer.h.1.mlp.c_fc.weight": 0.08 / math.sqrt(m_w),
        "transformer.h.0.attn.c_proj.weight": 0.08 / math.sqrt(2 * m_w * 2),
        "transformer.h.1.mlp.c_proj.weight": 0.08 / math.sqrt(2 * m_w * 2),
    }
    params = dict(model.named_parameters())
    for name, std in checks.items():
        assert params[name].std().item() == pytest.approx(trunc * std, rel=0.03), name
        assert params[name].abs().max().item() <= 2 * std + 1e-7, name


def test_mup_forward_multipliers() -> None:
    """Embedding x10, logits x 1/m_w and 1/d_head attention, checked against a hand-written forward."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, d_model=64, n_head=2, vocab_size=50, block_size=8, mup=True, mup_base_width=16)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 8))
    t = model.transformer
    x = (t.wte(idx) + t.wpe(torch.arange(8))) * 10
    blk = t.h[0]
    h = blk.ln_1(x)
    q, k, v = blk.attn.c_attn(h).split(64, dim=2)
    q, k, v = (z.view(2, 8, 2, 32).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-1, -2)) / 32  # 1/d_head
    att = att.masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")).softmax(-1)
    x = x + blk.attn.c_proj((att @ v).transpose(1, 2).reshape(2, 8, 64))
    x = x + blk.mlp(blk.ln_2(x))
    expected = model.lm_head(t.ln_f(x)) / 4  # m_w = 64 / 16
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_coordinate_check_flat_under_mup_and_growing_under_sp() -> None:
    """After a few Adam steps at the same base lr, activation and logit scales stay flat across widths
    under muP and grow with width under SP (the standard muP coordinate check)."""
    kw = dict(widths=(32, 64, 128, 256), steps=4, batch_size=4, seq_len=16, vocab_size=128)
    sp = coord_check(mup=False, **kw)
    mup = coord_check(mup=True, **kw)
    for name in ("block0", "block1"):
        assert sp.growth(name) > 6, (name, sp.final(name))
        assert 0.5 < mup.growth(name) < 1.5, (name, mup.final(name))
    assert sp.growth("logits") > 3, sp.final("logits")
    assert 0.5 < mup.growth("logits") < 1.5, mup.final("logits")
    # Under SP the spread across widths comes mostly from training: it widens step after step.
    assert all(len(v) == 4 for v in sp.sizes[32].values())
    spread = [sp.sizes[256]["block0"][t] / sp.sizes[32]["block0"][t] for t in range(4)]
    assert spread[-1] > 3 * spread[0], spread
