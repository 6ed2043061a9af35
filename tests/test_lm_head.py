"""The fused, chunked LM-head loss equals cross entropy over full logits, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cgpt.config import ModelConfig
from cgpt.hardware import default_fused_loss, resolve_fused_loss
from cgpt.lit_module import CerebrasGPTModule
from cgpt.lm_head import chunk_tokens, linear_cross_entropy
from cgpt.model import GPT

TINY = dict(n_layer=2, d_model=64, n_head=4, vocab_size=1000, block_size=32)


def _reference(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    logits = x @ w.t() * scale
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, ignore_index=-100)


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_loss_and_gradients_equal_full_logits_in_fp32(scale: float, chunk: int) -> None:
    torch.manual_seed(0)
    x0, w0 = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    y = torch.randint(0, 50, (37,))
    y[[0, 5, 36]] = -100  # ignored targets (SFT prompts, padding)
    grads = []
    for fn in (_reference, lambda x, w, y, s: linear_cross_entropy(x, w, y, s, chunk=chunk)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w, y, scale)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), x.grad, w.grad))
    for ref, fused in zip(grads[0], grads[1]):
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    assert grads[1][1][[0, 5, 36]].abs().max() == 0  # ignored positions get no gradient


def test_evaluation_path_and_all_ignored() -> None:
    torch.manual_seed(1)
    x, w, y = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, y, chunk=3), _reference(x, w, y, 1.0))
    assert torch.isnan(linear_cross_entropy(x, w, torch.full((20,), -100)))  # as F.cross_entropy


def test_bf16_autocast_gradients_are_as_accurate_as_the_unfused_head() -> None:
    """Under bf16 autocast both heads round; the fused one must not round more (vs fp32 truth)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    idx = torch.randint(0, 1000, (4, 32))

    def grads(fused: bool, autocast: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.fused_loss = fused
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            model.loss(idx[:, :-1], idx[:, 1:]).backward()
        return [p.grad.clone() for p in model.parameters()]

    truth = grads(False, False)
    for fused in (False, True):  # the fp32 paths agree exactly enough
        for a, b in zip(truth, grads(fused, False)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    err = {f: max(((t - g).norm() / t.norm()).item() for t, g in zip(truth, grads(f, True))) for f in (False, True)}
    assert err[True] < 1.5 * err[False] + 1e-3, err


@pytest.mark.parametrize("mup", [False, True])
def test_model_loss_is_the_same_fused_or_not(mup: bool) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, mup=mup))
    idx = torch.randint(0, 1000, (3, 20))
    targets = idx[:, 1:].clone()
    targets[0, :4] = -100
    losses = []
    for fused in (False, True):
        model.fused_loss = fused
        losses.append(model.loss(idx[:, :-1], targets))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    logits = model(idx[:, :-1])  # the logits path is untouched by the setting
    torch.testing.assert_close(losses[0], F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_settings_resolve_and_reach_the_model() -> None:
    assert default_fused_loss("cpu") is True and default_fused_loss("cuda") is False
    assert resolve_fused_loss(None) == "auto" and resolve_fused_loss("off") is False
    with pytest.raises(ValueError, match="fused_loss='sometimes': use true, false or auto"):
        resolve_fused_loss("sometimes")
    module = CerebrasGPTModule(model=TINY, fused_loss=False)
    module.configure_model()
    assert module.model.fused_loss is False
    # 128 tokens x 50257 fp32 logits ~ 24 MiB: a chunk that stays in a CPU's last-level cache.
    assert chunk_tokens(50257) == 128 and chunk_tokens(1000) == 8192


def test_padded_vocabulary_loss_and_gradients_equal_the_unpadded_ones():
    from cgpt.lm_head import LMHead, padded_cross_entropy

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(37, 16, generator=g, dtype=torch.float64)
    w0 = torch.randn(100, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 100, (37,), generator=g)
    y[[3, 20]] = -100  # ignored targets
    for scale in (1.0, 0.5):
        grads = []
        for loss_fn in (
            lambda x, w, s=scale: F.cross_entropy((x @ w.t()) * s, y, ignore_index=-100),
            lambda x, w, s=scale: padded_cross_entropy(x, w, y, s, -100, multiple=64),  # 100 -> 128
        ):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            loss = loss_fn(x, w)
            loss.backward()
            grads.append((loss.detach(), x.grad, w.grad))
        for a, b in zip(*grads, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12, rtol=0), scale
    head = LMHead(16, 100).double()
    reference = head(x0[None], y[None], ignore_index=-100)
    head.pad_vocab_to = 64
    padded = head(x0[None], y[None], ignore_index=-100)  # float64 softmax; the unpadded head's is fp32
    assert torch.allclose(padded.float(), reference, atol=1e-6, rtol=0)
    assert head(x0).shape == (37, 100)  # logits keep the real vocabulary
