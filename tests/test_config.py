"""ModelConfig validation, presets and their published shapes, and the conf/model files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from cgpt.config import ConfigError, ModelConfig, TrainingDefaults, normalize_preset_name
from cgpt.model import GPT
from cgpt.presets import PRESETS

PUBLISHED_PARAMS = {
    "cerebras-gpt-111m": 111_050_496,
    "cerebras-gpt-256m": 255_977_024,
    "cerebras-gpt-590m": 590_310_912,
    "cerebras-gpt-1.3b": 1_315_723_264,
    "cerebras-gpt-2.7b": 2_651_553_280,
    "cerebras-gpt-6.7b": 6_658_404_352,
    "cerebras-gpt-13b": 12_853_386_240,
}

# (layers, d_model, heads, d_head, d_ffn, lr, batch, warmup, decay, steps) from the reference doc.
PUBLISHED_SHAPES = {
    "cerebras-gpt-111m": (10, 768, 12, 64, 3072, 6.0e-4, 120, 1525, "linear", 9037),
    "cerebras-gpt-256m": (14, 1088, 17, 64, 4352, 6.0e-4, 264, 693, "linear", 9468),
    "cerebras-gpt-590m": (18, 1536, 12, 128, 6144, 2.0e-4, 264, 693, "linear", 21836),
    "cerebras-gpt-1.3b": (24, 2048, 16, 128, 8192, 2.0e-4, 528, 346, "cosine", 24334),
    "cerebras-gpt-2.7b": (32, 2560, 32, 80, 10240, 2.0e-4, 528, 346, "cosine", 49041),
    "cerebras-gpt-6.7b": (32, 4096, 32, 128, 16384, 1.2e-4, 1040, 176, "linear", 62522),
    "cerebras-gpt-13b": (40, 5120, 40, 128, 20480, 1.2e-4, 720, 254, "cosine", 57000),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_on_meta_device(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == PUBLISHED_PARAMS[name]
    assert cfg.num_params() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_preset_shapes_and_recipes_match_the_paper(name: str) -> None:
    layers, d, heads, d_head, ffn, lr, batch, warmup, decay, steps = PUBLISHED_SHAPES[name]
    cfg, rec = ModelConfig.from_name(name), TrainingDefaults.from_name(name)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_ffn) == (layers, d, heads, d_head, ffn)
    assert (cfg.vocab_size, cfg.block_size, cfg.layer_norm_eps) == (50257, 2048, 1e-5)
    assert (rec.lr, rec.batch_size, rec.warmup_steps, rec.decay, rec.max_steps) == (lr, batch, warmup, decay, steps)
    assert rec.adam_eps == (1e-9 if name in ("cerebras-gpt-6.7b", "cerebras-gpt-13b") else 1e-8)
    assert rec.final_lr_ratio == 0.1 and rec.betas == (0.9, 0.95) and rec.weight_decay == 0.1


def test_output_projection_std_per_size() -> None:
    # ModelZoo's yamls: 0.004472135954999579, 0.003779644730092272, 0.0033333333333333335 (exact).
    expected = {"111m": 0.02 / math.sqrt(20), "256m": 0.02 / math.sqrt(28), "590m": 0.02 / 6, "1.3b": 0.0025}
    for size, std in expected.items():
        cfg = ModelConfig.from_name(size)
        assert cfg.residual_init_std == std
        assert cfg.hidden_init_std == cfg.embedding_init_std == 0.02
    # The first three follow 0.02 / sqrt(2 n_layer); a custom shape defaults to that rule.
    assert ModelConfig(n_layer=10, d_model=64, n_head=4).residual_init_std == pytest.approx(0.02 / math.sqrt(20))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_layer": 2, "d_model": 66, "n_head": 4}, ["d_model=66", "n_head=4"]),
        ({"n_layer": 0, "d_model": 64, "n_head": 4}, ["n_layer", "positive"]),
        ({"n_layer": 2, "d_model": 64, "n_head": 4, "layer_norm_eps": 0.0}, ["layer_norm_eps"]),
        ({"n_layer": 2, "d_model": 64, "n_head": 4, "vocab_size": -5}, ["vocab_size"]),
    ],
)
def test_invalid_configs_fail_with_a_clear_message(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_preset_names_are_normalised_and_unknown_ones_listed() -> None:
    assert normalize_preset_name("cerebras_gpt_1.3b") == "cerebras-gpt-1.3b"
    assert normalize_preset_name("111M") == "cerebras-gpt-111m"
    with pytest.raises(ConfigError, match="available"):
        ModelConfig.from_name("cerebras-gpt-7b")
    with pytest.raises(ConfigError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"name": "cerebras-gpt-tiny", "n_layers": 3})


def test_from_dict_round_trip_and_overrides() -> None:
    cfg = ModelConfig.from_dict({"name": "cerebras-gpt-111m", "n_layer": 2})
    assert cfg.n_layer == 2 and cfg.d_model == 768
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def test_every_preset_has_a_hydra_file_that_agrees_with_the_table() -> None:
    files = {yaml.safe_load(p.read_text())["name"]: yaml.safe_load(p.read_text()) for p in CONF_MODEL.glob("*.yaml")}
    assert set(files) == set(PRESETS)
    for name, data in files.items():
        assert ModelConfig.from_dict(data) == ModelConfig.from_name(name)
