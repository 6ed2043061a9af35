"""The GPT network: shapes, causality, initialisation statistics, muP multipliers."""

from __future__ import annotations

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.model import GPT

TINY = dict(n_layer=2, d_model=64, n_head=4, vocab_size=1000, block_size=32)


def test_forward_shapes_and_tied_head() -> None:
    model = GPT(ModelConfig(**TINY))
    logits = model(torch.randint(0, 1000, (3, 17)))
    assert logits.shape == (3, 17, 1000)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("mup", [False, True])
def test_changing_a_token_never_changes_earlier_logits(mup: bool) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, mup=mup)).eval()
    x = torch.randint(0, 1000, (2, 20))
    base = model(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 1000
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_init_statistics_follow_the_cerebras_recipe() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, d_model=256, n_head=4, vocab_size=4096, block_size=256, output_init_std=0.005)
    model = GPT(cfg)
    p = dict(model.named_parameters())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.1.mlp.c_fc.weight"):  # fmt: skip
        w = p[name]
        assert w.std().item() == pytest.approx(0.02 * 0.8796, rel=0.05)  # std of a normal truncated at 2 sigma
        assert w.abs().max().item() <= 2 * 0.02 + 1e-7
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"):
        assert p[name].std().item() == pytest.approx(0.005 * 0.8796, rel=0.05)
        assert p[name].abs().max().item() <= 2 * 0.005 + 1e-7
    for name, w in p.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(w) == 0
        if ".ln_" in name and name.endswith("weight"):
            assert torch.all(w == 1)


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_mup_changes_init_and_output_scale() -> None:
    cfg = ModelConfig(n_layer=2, d_model=768, n_head=12, vocab_size=2000, block_size=64, mup=True)
    assert cfg.width_mult == 3.0
    assert cfg.hidden_init_std == pytest.approx(0.04619, rel=1e-3)
    assert cfg.residual_init_std == pytest.approx(0.08 / (2 * 3.0 * 2) ** 0.5)
    assert cfg.attn_scale == pytest.approx(1 / 64)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.08 * 0.8796, rel=0.05)
    # Logits are the head output times 1/m_w: compare with the same weights run as SP.
    x = torch.randint(0, 2000, (1, 8))
    with torch.no_grad():
        h = model.transformer.ln_f(
            _blocks(model, (model.transformer.wte(x) + model.transformer.wpe(torch.arange(8))) * 10.0)
        )
        expected = model.lm_head(h) / 3.0
    assert torch.allclose(model(x), expected, atol=1e-5)


def _blocks(model: GPT, x: torch.Tensor) -> torch.Tensor:
    for b in model.transformer.h:
        x = b(x)
    return x


def test_meta_device_model_materialises_with_the_same_init() -> None:
    cfg = ModelConfig(**TINY)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    torch.manual_seed(1)
    model.init_weights()
    ref = GPT(cfg)
    torch.manual_seed(1)
    ref.init_weights()
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_loss_is_mean_token_cross_entropy() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    x = torch.randint(0, 1000, (2, 9))
    loss = model.loss(x[:, :-1], x[:, 1:])
    logp = torch.log_softmax(model(x[:, :-1]), -1)
    manual = -logp.gather(-1, x[:, 1:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
