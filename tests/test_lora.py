"""LoRA: adapters start as a no-op, only adapters train, merging keeps the outputs, adapters round-trip."""

from __future__ import annotations

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    has_lora,
    load_adapters,
    merge_lora,
    parameter_report,
    save_adapters,
)
from cgpt.model import GPT

TINY = dict(n_layer=2, d_model=32, n_head=4, vocab_size=97, block_size=16)


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw}))


def _randomise_adapters(model: GPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_fresh_adapters_change_nothing_and_only_adapters_train() -> None:
    model = _model()
    idx = torch.randint(0, 97, (2, 12))
    before = model(idx)
    apply_lora(model, LoRAConfig(rank=4, targets=["attention", "mlp.c_fc"]))
    assert torch.equal(model(idx), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # (A, B) x 3 linears x 2 layers
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)
    assert not isinstance(model.transformer.h[0].mlp.c_proj, LoRALinear)
    # The base keeps its GPT-2 names (so init_from and HF export still recognise it).
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()
    model(idx).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    report = parameter_report(model)
    assert report["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert report["grads_and_optimizer_gb"] < report["full_finetune_gb"]


@pytest.mark.parametrize("mup", [False, True])
def test_merge_gives_a_plain_gpt_with_the_same_outputs(mup: bool) -> None:
    model = _model(mup=mup, mup_base_width=16)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    _randomise_adapters(model)
    idx = torch.randint(0, 97, (2, 12))
    unmerged = model(idx)
    merged = merge_lora(model)
    assert not has_lora(merged)
    plain = GPT(merged.config)
    plain.load_state_dict(merged.state_dict(), strict=True)  # the exact keys of a plain GPT
    torch.testing.assert_close(plain(idx), unmerged, rtol=1e-5, atol=1e-5)
    # The merge really moved the weights (a merge that dropped the update would fail here).
    assert not torch.allclose(plain(idx), _model(mup=mup, mup_base_width=16)(idx), atol=1e-4)


def test_adapters_save_and_load_on_their_own(tmp_path) -> None:
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, targets=["attn.c_attn"]))
    _randomise_adapters(model)
    path = save_adapters(model, tmp_path / "adapters.pt")
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < full / 5  # the adapters alone, not the base
    idx = torch.randint(0, 97, (1, 10))
    fresh = load_adapters(_model(), path)  # same base seed, adapters from the file
    torch.testing.assert_close(fresh(idx), model(idx))
    with pytest.raises(ValueError, match="do not fit"):
        load_adapters(_model(d_model=48, n_head=4), path)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=["attn.q_proj"])


def test_merge_cli_writes_a_hf_folder_equal_to_base_plus_adapters(tmp_path) -> None:
    from cgpt.cli.lora import main
    from cgpt.hf import from_hf

    base = _model()
    ckpt = tmp_path / "base.ckpt"
    state = {f"model.{k}": v for k, v in base.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": base.config.to_dict()}}, ckpt)
    apply_lora(base, LoRAConfig(rank=2, targets=["mlp"]))
    _randomise_adapters(base)
    save_adapters(base, tmp_path / "adapters.pt")
    assert main(["merge", str(ckpt), "--adapters", str(tmp_path / "adapters.pt"), "--out", str(tmp_path / "hf")]) == 0
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(from_hf(tmp_path / "hf")(idx), base(idx), rtol=1e-5, atol=1e-5)
