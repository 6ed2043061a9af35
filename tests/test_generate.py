"""Generation: greedy parity with transformers, cache vs no cache, left padding, top-k/top-p, EOS, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.generate import filter_logits, generate, sample_next
from cgpt.model import GPT

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 211


def _model(mup: bool = False, seed: int = 0) -> GPT:
    """Random weights with clearly separated logits, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=VOCAB, block_size=64, mup=mup)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r) :] = r
    return out, [len(r) for r in rows]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory):
    import transformers

    from cgpt.hf import to_hf

    model = _model()
    path = to_hf(model, tmp_path_factory.mktemp("hf"))
    return model, transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def test_greedy_matches_transformers(hf_pair) -> None:
    model, hf = hf_pair
    idx = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    ours = generate(model, idx, 24, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(
            idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=24, pad_token_id=0
        )
    assert torch.equal(ours, theirs)


def test_left_padded_greedy_matches_transformers(hf_pair) -> None:
    model, hf = hf_pair
    g = torch.Generator().manual_seed(1)
    idx, lengths = _left_pad([torch.randint(0, VOCAB, (n,), generator=g) for n in (11, 3, 7)])
    ours = generate(model, idx, 16, temperature=0, prompt_lengths=lengths)
    attention_mask = (torch.arange(idx.size(1))[None, :] >= idx.size(1) - torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=attention_mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
def test_cached_equals_uncached(mup: bool) -> None:
    model = _model(mup)
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = generate(model, idx, 30, temperature=0)
    assert cached.shape == (2, 35) and torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, generate(model, idx, 30, temperature=0, use_cache=False))
    # The cache path's logits equal a full forward over the generated sequence.
    model.setup_kv_cache(2, 35)
    try:
        with torch.no_grad():
            step_logits = [model(cached[:, :5])[:, -1]]
            step_logits += [model(cached[:, t : t + 1], start=t)[:, -1] for t in range(5, 34)]
    finally:
        model.clear_kv_cache()
    with torch.no_grad():
        full = model(cached[:, :34])[:, 4:]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(cached, last_only=True), model(cached)[:, -1:])
    assert model.kv_caches is None and not model.training


def test_left_padded_batch_equals_single_prompts() -> None:
    model = _model(seed=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (2, 9, 5)]
    idx, lengths = _left_pad(prompts, pad_id=7)
    for use_cache in (True, False):
        batch = generate(model, idx, 12, temperature=0, prompt_lengths=lengths, use_cache=use_cache)
        for i, p in enumerate(prompts):
            single = generate(model, p[None], 12, temperature=0)
            assert torch.equal(batch[i, idx.size(1) :], single[0, len(p) :]), (i, use_cache)


def test_sampling_is_reproducible_and_cache_independent() -> None:
    model = _model(seed=4)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))

    def run(use_cache: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, idx, 20, temperature=1.0, top_k=50, top_p=0.9, use_cache=use_cache, generator=g)

    a = run(True, 0)
    assert torch.equal(a, run(True, 0)) and torch.equal(a, run(False, 0))
    assert not torch.equal(a, run(True, 1))


def test_output_trains_and_training_mode_is_restored() -> None:
    """Decoding runs under inference_mode, yet the returned ids feed a training step."""
    model = _model(seed=8).train()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 4, temperature=0)
    assert model.training and model.kv_caches is None and not out.is_inference()
    model.loss(out[:, :-1], out[:, 1:]).backward()
    assert model.transformer.wte.weight.grad is not None


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=100)).all()


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, False, False]]
    # Survivors keep their logits, so renormalised probabilities are proportional to the originals.
    torch.testing.assert_close(filter_logits(logits, top_p=0.75)[0, [1, 3]], logits[0, [1, 3]])


def test_top_k_top_p_match_transformers_warpers() -> None:
    from transformers.generation import logits_process as lp

    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(5)) * 3
    ids = torch.zeros(16, 1, dtype=torch.long)
    for k in (1, 7, 40):
        expected = lp.TopKLogitsWarper(k)(ids, logits.clone())
        assert torch.equal(torch.isfinite(filter_logits(logits, top_k=k)), torch.isfinite(expected))
    for p in (0.3, 0.8, 0.95):
        expected = lp.TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(torch.isfinite(filter_logits(logits, top_p=p)), torch.isfinite(expected))


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(6)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=0.02, rtol=0)
    draws = sample_next(logits, temperature=1.0, top_p=0.85, generator=g)  # nucleus {0, 1, 2}
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=0.02, rtol=0)
    assert torch.equal(sample_next(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))


def test_eos_stops_rows_and_decoding() -> None:
    model = _model(seed=7)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, idx, 10, temperature=0)
    eos = int(free[0, 6])
    first = 4 + int((free[0, 4:] == eos).nonzero()[0])  # where row 0 first emits it
    out = generate(model, idx, 10, temperature=0, eos_id=eos)
    assert torch.equal(out[0, : first + 1], free[0, : first + 1]) and (out[0, first:] == eos).all()
    if not (free[1, 4:] == eos).any():
        assert out.shape == free.shape and torch.equal(out[1], free[1])  # the other row runs on
    # Every row finished -> decoding stops early.
    alone = generate(model, idx[:1], 10, temperature=0, eos_id=eos)
    assert alone.shape == (1, first + 1)


def test_bad_arguments_are_refused() -> None:
    model = _model()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, idx, 61)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, idx, 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, idx, 2, temperature=-1)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, idx, 2, prompt_lengths=[5])


def test_generate_cli_completes_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cgpt.cli.generate as cli
    from cgpt.generate import complete
    from cgpt.hf import to_hf

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, block_size=32))  # GPT-2 vocab
    hf_dir = to_hf(model, tmp_path / "hf")
    prompts = ["Hello world", "The Pile is a large"]
    texts = complete(model, prompts, max_new_tokens=5, temperature=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    single = complete(model, prompts[:1], max_new_tokens=5, temperature=0)
    assert single[0] == texts[0]  # batching with left padding changes nothing
    args = [str(hf_dir), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "5", "--temperature", "0"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1 ===" in out and prompts[0] + texts[0] in out
    assert cli.main([str(tmp_path / "missing.ckpt"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
