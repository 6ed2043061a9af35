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
from test_evaluate import CFG, reference_loglikelihood, to_hf

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
def test_simple_evaluate_matches_cgpt_evaluator(model, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task yaml names its data file relative to the repository
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = lm_eval.simple_evaluate(
        model=CgptLM(model=model, batch_size=4),
        tasks=["cgpt_tiny_mc"],
        task_manager=TaskManager(include_path=str(ROOT / "tests/data/lm_eval")),
    )["results"]["cgpt_tiny_mc"]
    ours = evaluate_multiple_choice(
        model, get_tokenizer(), load_task(ROOT / "tests/data/tiny_multiple_choice.jsonl")[1]
    )
    assert res["acc,none"] == pytest.approx(ours["acc"]) and res["acc_norm,none"] == pytest.approx(ours["acc_norm"])
