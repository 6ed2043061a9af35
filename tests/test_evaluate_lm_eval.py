"""cgpt.lm_eval_adapter: the "cgpt" model of lm-evaluation-harness.

The adapter logic is tested with duck-typed requests (objects with ``.args``) everywhere; where
lm-eval is installed, also with its own Instance objects, its registry and a full
``simple_evaluate`` on a local task that must agree with cgpt's own evaluator.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import EVAL_CFG as CFG
from conftest import reference_loglikelihood, to_hf

from cgpt.config import ModelConfig
from cgpt.data.tokenizer import get_tokenizer
from cgpt.evaluate import evaluate_multiple_choice, load_task, rolling_loglikelihood
from cgpt.lm_eval_adapter import CgptLM
from cgpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    return GPT(ModelConfig(**CFG)).eval()


def req(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_equals_hf_reference(model):
    lm = CgptLM(model=model, batch_size=2, device="cpu")
    tok = get_tokenizer()
    hf = to_hf(model)
    pairs = [("The kettle began to whistle, so she ", "took it off"), ("", "Hello world"), ("Hello", " world")]
    got = lm.loglikelihood([req(c, x) for c, x in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        # lm-eval's convention: the trailing space belongs to the continuation; empty context = EOS
        n = len(ctx) - len(ctx.rstrip(" "))
        c_ids = tok.encode(ctx[: len(ctx) - n]) if ctx.strip() else [50256]
        ref = reference_loglikelihood(hf, c_ids, tok.encode(ctx[len(ctx) - n :] + cont))
        assert ll == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]


def test_loglikelihood_rolling_and_generate(model):
    lm = CgptLM(model=model)
    text = "To be, or not to be, that is the question. " * 8  # longer than the 64-token context
    (ll,) = lm.loglikelihood_rolling([req(text)])
    assert ll == pytest.approx(rolling_loglikelihood(model, get_tokenizer().encode(text), 64), abs=1e-6)
    assert ll < 0
    out = lm.generate_until([req("ROMEO:", {"until": ["\n"], "max_gen_toks": 5}), req("Hi", {"max_gen_toks": 3})])
    assert len(out) == 2 and all(isinstance(s, str) and "\n" not in s for s in out)
    assert len(get_tokenizer().encode(out[1])) <= 3


def test_constructor_needs_a_model():
    with pytest.raises(ValueError, match="pretrained"):
        CgptLM()


def test_registered_and_real_instances(model):
    from lm_eval.api import registry
    from lm_eval.api.instance import Instance

    assert registry.get_model("cgpt") is CgptLM
    lm = CgptLM(model=model)
    inst = [Instance("loglikelihood", {}, ("Hello", " world"), idx=0)]
    assert lm.loglikelihood(inst) == lm.loglikelihood([req("Hello", " world")])


@pytest.mark.slow
def test_simple_evaluate_scores_every_request_as_cgpt_does(tmp_path, monkeypatch):
    """lm-eval's own pipeline (task yaml, request building, batching) through the adapter gives, per
    request, the log-likelihood cgpt's evaluator computes, on a model whose choices differ by whole
    nats (an untrained model is near-uniform: accuracies alone would agree by accident)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cgpt.evaluate import encode_pair, loglikelihoods

    torch.manual_seed(3)
    sharp = GPT(ModelConfig(**CFG)).eval()
    with torch.no_grad():
        sharp.transformer.wte.weight.normal_(0, 1.0)  # large logits: far from uniform
    monkeypatch.chdir(ROOT)  # the task yaml names its data file relative to the repository
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model=CgptLM(model=sharp, batch_size=4),
        tasks=["cgpt_tiny_mc"],
        task_manager=TaskManager(include_path=str(ROOT / "tests/data/lm_eval")),
        log_samples=True,
    )
    tok = get_tokenizer()
    examples = load_task(ROOT / "tests/data/tiny_multiple_choice.jsonl")[1]
    samples = sorted(out["samples"]["cgpt_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(examples) == 6
    for sample, ex in zip(samples, examples):
        theirs = [float(r[0][0]) for r in sample["resps"]]
        requests = [encode_pair(tok, ex["context"], c) for c in ex["continuations"]]
        ours = [ll for ll, _ in loglikelihoods(sharp, requests)]
        assert max(ours) - min(ours) > 1.0, ours  # the choices are told apart
        # Measured: bitwise equal (scores of -50 to -420 nats, choices 3 to 120 nats apart); 1e-4
        # leaves room for another batch layout only. A wrong token or context moves a score by nats.
        assert theirs == pytest.approx(ours, abs=1e-4, rel=0), (ex["context"], theirs, ours)
    ours = evaluate_multiple_choice(sharp, tok, examples)
    res = out["results"]["cgpt_tiny_mc"]
    assert (res["acc,none"], res["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]))
