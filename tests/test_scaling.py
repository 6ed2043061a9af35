"""FLOP conventions against the paper (cgpt.flops), the planner (cgpt.planning) and the power-law fit
(cgpt.scaling_law)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cgpt.config import ConfigError, ModelConfig
from cgpt.flops import flops_per_token, published_tokens, training_flops
from cgpt.planning import memory_per_device, plan_training, strategy_configs
from cgpt.presets import PUBLISHED_TRAIN_FLOPS
from cgpt.scaling_law import PUBLISHED_LAW, FitError, fit_power_law, fit_table, law_loss, plot_fit, published_points


@pytest.mark.parametrize("name", list(PUBLISHED_TRAIN_FLOPS))
def test_training_flops_match_published_within_10_percent(name):
    cfg = ModelConfig.from_name(name)
    flops = training_flops(cfg, published_tokens(name), 2048)
    assert flops == pytest.approx(PUBLISHED_TRAIN_FLOPS[name], rel=0.10)


@pytest.mark.parametrize("name", list(PUBLISHED_TRAIN_FLOPS))
def test_planner_reproduces_published_recipe(name):
    """20 tokens/param, the published batch and warmup (~375M tokens), FLOPs within 10%."""
    plan = plan_training(ModelConfig.from_name(name))
    assert plan.tokens == pytest.approx(20 * plan.params)
    assert plan.train_flops == pytest.approx(PUBLISHED_TRAIN_FLOPS[name], rel=0.10)
    if name != "cerebras-gpt-13b":  # 13B trained 57k+78k steps at two batch sizes
        from cgpt.config import TrainingDefaults

        t = TrainingDefaults.from_name(name)
        assert plan.batch_size == t.batch_size
        assert plan.steps == pytest.approx(t.max_steps, rel=0.01)
        assert abs(plan.warmup_steps - t.warmup_steps) <= 2


def test_flop_conventions_order_and_palm_matches_model_config():
    cfg = ModelConfig.from_name("111m")
    assert flops_per_token(cfg, 2048, "palm") == cfg.flops_per_token(2048)
    f = {c: flops_per_token(cfg, 2048, c) for c in ("6nd", "palm", "cerebras")}
    assert f["6nd"] < f["palm"] < f["cerebras"]
    with pytest.raises(ConfigError, match="convention"):
        flops_per_token(cfg, 2048, "nope")


def test_plan_budgets_and_wall_time():
    cfg = ModelConfig.from_name("1.3b")
    by_compute = plan_training(cfg, compute=1e20)
    assert by_compute.train_flops == pytest.approx(1e20, rel=1e-9)
    by_tokens = plan_training(cfg, tokens=1e9)
    assert by_tokens.tokens == 1e9 and by_tokens.steps == math.ceil(1e9 / (528 * 2048))
    p64 = plan_training(cfg, gpus=64, gpu="H100_SXM", mfu=0.4)
    p128 = plan_training(cfg, gpus=128, gpu="H100_SXM", mfu=0.4)
    assert p64.wall_time_s == pytest.approx(p64.train_flops_palm / (64 * 989e12 * 0.4))
    assert p128.wall_time_s == pytest.approx(p64.wall_time_s / 2)
    with pytest.raises(ConfigError, match="not both"):
        plan_training(cfg, tokens=1, compute=1)
    with pytest.raises(ConfigError, match="unknown GPU"):
        plan_training(cfg, gpus=1, gpu="TPU9000")


def test_custom_shape_takes_nearest_published_recipe():
    cfg = ModelConfig(n_layer=12, d_model=768, n_head=12, name="custom")
    plan = plan_training(cfg)
    assert plan.recipe_from == "cerebras-gpt-111m"
    assert plan.warmup_steps == round(375e6 / (120 * 2048))


def test_memory_sharding_reduces_states():
    cfg = ModelConfig.from_name("1.3b")
    mem = {k: memory_per_device(cfg, s, 64, 1, 2048) for k, s in strategy_configs().items()}
    assert mem["fsdp"]["states"] < mem["deepspeed_stage_2"]["states"] < mem["ddp"]["states"]
    assert mem["ddp"]["states"] >= 16 * cfg.num_params() * 0.99  # fp32 weights, grads, 2 Adam moments
    ckpt = memory_per_device(cfg, strategy_configs()["ddp"], 64, 1, 2048, activation_checkpointing=True)
    assert ckpt["activations"] < mem["ddp"]["activations"]


def test_fit_recovers_published_law():
    names, compute, loss = published_points()
    fit = fit_power_law(compute, loss)
    assert fit.alpha == pytest.approx(PUBLISHED_LAW["alpha"], rel=0.02)
    assert fit.l_inf == pytest.approx(PUBLISHED_LAW["l_inf"], rel=0.02)
    # c0 sits in a flat valley (the published law's squared error is within 0.5% of the optimum):
    # compare it in log space and by the predictions it makes.
    assert fit.c0 == pytest.approx(PUBLISHED_LAW["c0"], rel=0.10)
    assert math.log(fit.c0) == pytest.approx(math.log(PUBLISHED_LAW["c0"]), rel=0.002)
    grid = np.geomspace(1e18, 1e23, 20)
    np.testing.assert_allclose(fit.predict(grid), law_loss(grid, **PUBLISHED_LAW), rtol=0.005)
    assert fit.max_rel_error < 0.011  # the law reproduces each published loss within about 1%
    table = fit_table(names, compute, loss, fit)
    assert table.count("\n") == len(names) + 1 and "cerebras-gpt-13b" in table


def test_fit_exact_synthetic_and_fixed_l_inf():
    c = np.geomspace(1e15, 1e19, 6)
    y = law_loss(c, 3e20, 0.1, 1.5)
    fit = fit_power_law(c, y)
    assert (fit.c0, fit.alpha, fit.l_inf) == pytest.approx((3e20, 0.1, 1.5), rel=1e-4)
    two = fit_power_law(c[:2], y[:2], l_inf=1.5)
    assert two.l_inf_fixed and two.alpha == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(FitError, match="l_inf=0"):
        fit_power_law(c[:2], y[:2])
    with pytest.raises(FitError, match="below the smallest loss"):
        fit_power_law(c, y, l_inf=10.0)


def test_plot_fit_writes_png(tmp_path):
    names, compute, loss = published_points()
    fit = fit_power_law(compute, loss)
    out = tmp_path / "fit.png"
    plot_fit(str(out), names, compute, loss, fit, reference=PUBLISHED_LAW)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_keeps_irreducible_loss_non_negative():
    # Under-trained CPU points that curve the wrong way would pull L_inf below zero.
    fit = fit_power_law([1.791e11, 5.379e11, 1.276e12], [10.675, 10.2418, 9.3483])
    assert 0.0 <= fit.l_inf < 9.3483 and fit.alpha > 0
