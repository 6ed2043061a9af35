"""cgpt.evaluate: log-likelihoods equal transformers' GPT2LMHeadModel's; task metrics; CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EVAL_CFG as CFG
from conftest import reference_loglikelihood, to_hf

from cgpt.config import ModelConfig
from cgpt.data.tokenizer import get_tokenizer
from cgpt.evaluate import (
    TaskFormatError,
    encode_pair,
    evaluate_lambada,
    evaluate_multiple_choice,
    load_model,
    load_task,
    loglikelihoods,
    rolling_loglikelihood,
    validation_loss,
)
from cgpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
MC_TASK = DATA / "tiny_multiple_choice.jsonl"
LAMBADA_TASK = DATA / "tiny_lambada.jsonl"


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(**CFG)).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a wrong copy cannot pass
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def requests(tok) -> list[tuple[list[int], list[int]]]:
    pairs = [
        ("The kettle began to whistle, so she", " took it off the stove."),
        ("Hello", " world"),
        ("", "An empty context is scored after the EOS token."),
        ("ROMEO: But soft, what light through yonder window", " breaks?"),
    ]
    return [encode_pair(tok, c, x) for c, x in pairs]


def test_loglikelihoods_equal_hf_gpt2(model):
    tok = get_tokenizer()
    hf = to_hf(model)
    reqs = requests(tok)
    ours = loglikelihoods(model, reqs, batch_size=3)
    via_hf = loglikelihoods(hf, reqs, batch_size=2, block_size=64)
    for (ctx, cont), a, b in zip(reqs, ours, via_hf):
        ref, greedy = reference_loglikelihood(hf, ctx, cont)
        assert a[0] == pytest.approx(ref, abs=1e-4) and b[0] == pytest.approx(ref, abs=1e-4)
        assert a[1] == greedy == b[1]


def test_batching_and_truncation_do_not_change_scores(model):
    tok = get_tokenizer()
    reqs = requests(tok)
    one = loglikelihoods(model, reqs, batch_size=1)
    many = loglikelihoods(model, reqs, batch_size=4)
    for a, b in zip(one, many):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    long_ctx = list(range(1000, 1100))  # longer than the 64-token context: truncated from the left
    (ll,) = loglikelihoods(model, [(long_ctx, [5, 6])])
    (ref,) = loglikelihoods(model, [(long_ctx[-63:], [5, 6])])
    assert ll[0] == pytest.approx(ref[0], abs=1e-5)
    with pytest.raises(ValueError, match="empty context"):
        loglikelihoods(model, [([], [1])])


def test_encode_pair_moves_trailing_space_and_prefixes_eos():
    tok = get_tokenizer()
    assert encode_pair(tok, "Hello ", "world") == (tok.encode("Hello"), tok.encode(" world"))
    assert encode_pair(tok, "", "Hi")[0] == [50256]


def test_rolling_loglikelihood_matches_single_pass_and_windows(model):
    tokens = get_tokenizer().encode("To be, or not to be, that is the question.")
    seq = torch.tensor([[50256] + tokens])
    with torch.no_grad():
        logp = F.log_softmax(model(seq[:, :-1])[0], -1)
    direct = logp[torch.arange(len(tokens)), seq[0, 1:]].sum().item()
    assert rolling_loglikelihood(model, tokens) == pytest.approx(direct, abs=1e-4)
    # In windows of 5 every token is still scored exactly once: compare with lm-eval's own windows.
    import lm_eval.utils as lm_utils

    expected = 0.0
    for ctx, pred in lm_utils.get_rolling_token_windows(tokens, 50256, 5, 1):
        (ll,) = loglikelihoods(model, [(list(ctx[: len(ctx) - len(pred) + 1]), list(pred))], block_size=5)
        expected += ll[0]
    assert rolling_loglikelihood(model, tokens, block_size=5) == pytest.approx(expected, abs=1e-4)


class FavouriteToken(torch.nn.Module):
    """A fake LM that always predicts one token with probability ~1 (or uniform when None)."""

    def __init__(self, token: int | None, vocab: int = 50257, block_size: int = 256) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab
        self.config = type("C", (), {"block_size": block_size})()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab)
        if self.token is not None:
            logits[..., self.token] = 50.0
        return logits


def test_multiple_choice_metrics():
    tok = get_tokenizer()
    kind, examples = load_task(MC_TASK)
    assert kind == "multiple_choice" and len(examples) == 6 and examples[-1]["gold"] == 0
    # Under a uniform model log-likelihood is -n_tokens*log V: acc picks the fewest tokens, acc_norm
    # the fewest tokens per character. Compute both by hand and compare.
    uniform = FavouriteToken(None)
    exp_acc = exp_norm = 0
    for ex in examples:
        n_tok = [len(encode_pair(tok, ex["context"], c)[1]) for c in ex["continuations"]]
        ll = [-n * math.log(50257) for n in n_tok]
        exp_acc += max(range(len(ll)), key=ll.__getitem__) == ex["gold"]
        norm = [v / len(c) for v, c in zip(ll, ex["continuations"])]
        exp_norm += max(range(len(ll)), key=norm.__getitem__) == ex["gold"]
    r = evaluate_multiple_choice(uniform, tok, examples, batch_size=5)
    assert r["acc"] == pytest.approx(exp_acc / 6) and r["acc_norm"] == pytest.approx(exp_norm / 6)
    assert r["examples"] == 6


def test_lambada_accuracy_and_perplexity():
    tok = get_tokenizer()
    examples = [{"text": "hello world"}, {"text": "the whole world"}, {"text": "a new day"}]
    world = tok.encode(" world")
    assert len(world) == 1
    r = evaluate_lambada(FavouriteToken(world[0]), tok, examples)
    assert r["acc"] == pytest.approx(2 / 3)
    # two targets with probability ~1, one with ~exp(-50): ppl = exp(50 / 3)
    assert math.log(r["ppl"]) == pytest.approx(50 / 3, rel=1e-3)
    kind, rows = load_task(LAMBADA_TASK)
    assert kind == "lambada" and len(rows) == 5


def test_task_format_errors(tmp_path):
    alt = tmp_path / "alt.jsonl"
    alt.write_text('{"query": "a", "choices": [" b", " c"], "label": 1}\n')
    assert load_task(alt) == ("multiple_choice", [{"context": "a", "continuations": [" b", " c"], "gold": 1}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "continuations": [" b", " c"], "gold": 5}\n')
    with pytest.raises(TaskFormatError, match="gold"):
        load_task(bad)
    bad.write_text("{not json\n")
    with pytest.raises(TaskFormatError, match=":1: invalid JSON"):
        load_task(bad)
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(TaskFormatError, match="two words"):
        load_task(bad)


@pytest.fixture(scope="module")
def small_val_dir(tmp_path_factory) -> Path:
    """A prepared dataset whose val split holds a handful of 64-token samples."""
    from cgpt.data.prepare import prepare

    text = (MC_TASK.read_text() + LAMBADA_TASK.read_text()).replace('"', "")
    src = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i}: {text}"}) + "\n" for i in range(4)))
    out = tmp_path_factory.mktemp("prepared")
    prepare([str(src)], out, seq_len=64, val_every=2, shard_size_mb=0.1, log=lambda m: None)
    return out


def test_validation_loss_matches_model_loss(model, small_val_dir):
    import numpy as np
    import webdataset as wds

    from cgpt.data.shards import DatasetMeta, iter_tar_samples

    meta = DatasetMeta.load(small_val_dir)
    rows = []
    for shard in meta.shards("val"):
        url = str(small_val_dir / shard["name"])
        with wds.gopen(url, "rb") as f:
            rows += list(iter_tar_samples(f, url, meta.sample_len))
    assert 5 < len(rows) < 40 and len(rows) % 5  # a ragged last micro-batch of 5
    rows = torch.from_numpy(np.stack(rows).astype(np.int64))
    with torch.no_grad():
        expected = model.loss(rows[:, :-1], rows[:, 1:]).item()
    r = validation_loss(model, small_val_dir, micro_batch_size=5)
    assert r["tokens"] == len(rows) * meta.seq_len  # every sample read, the ragged tail included
    assert r["loss"] == pytest.approx(expected, rel=1e-5) and r["ppl"] == pytest.approx(math.exp(expected))
    capped = validation_loss(model, small_val_dir, micro_batch_size=2, max_batches=2)
    assert capped["batches"] == 2 and capped["tokens"] == 4 * meta.seq_len
    with torch.no_grad():
        assert capped["loss"] == pytest.approx(model.loss(rows[:4, :-1], rows[:4, 1:]).item(), rel=1e-5)


def _save_ckpt(model: GPT, path: Path) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"model": model.config.to_dict()}, "state_dict": state}, path)


def test_load_model_from_checkpoint(model, tmp_path):
    _save_ckpt(model, tmp_path / "m.ckpt")
    loaded = load_model(tmp_path / "m.ckpt")
    x = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.ckpt")


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_evaluate_cli(model, tmp_path, small_val_dir, capsys):
    import cgpt.cli.evaluate as evaluate_cli

    run_dir = tmp_path / "run" / "checkpoints"
    run_dir.mkdir(parents=True)
    _save_ckpt(model, run_dir / "last.ckpt")
    out = tmp_path / "eval.json"
    evaluate_cli.main(
        ["--model", str(tmp_path / "run"), "--data", str(small_val_dir), "--max-batches", "2", "--tasks",
         str(MC_TASK), str(LAMBADA_TASK), "--limit", "3", "--batch-size", "4", "--out", str(out), "--device", "cpu"]
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert res["validation"]["batches"] == 2 and res["validation"]["loss"] > 0
    assert set(res["tasks"]) == {"tiny_multiple_choice", "tiny_lambada"}
    assert res["tasks"]["tiny_lambada"]["examples"] == 3 and "ppl" in res["tasks"]["tiny_lambada"]
    assert "tiny_multiple_choice (multiple_choice, 3 examples)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot load --model"):
        evaluate_cli.main(["--model", str(tmp_path / "nope.ckpt"), "--tasks", str(MC_TASK)])
