"""EleutherAI lm-evaluation-harness adapter: the model name ``cgpt``.

The paper's downstream numbers come from lm-evaluation-harness. With ``pip install lm-eval``:

    python -m cgpt.lm_eval_adapter --model cgpt --model_args pretrained=outputs/demo --batch_size 16 \\
        --tasks hellaswag,piqa,winogrande,lambada_openai,arc_easy,arc_challenge,openbookqa

``python -m cgpt.lm_eval_adapter`` is lm-eval's own command line with ``cgpt`` registered (plain
``lm_eval --model cgpt`` cannot see models outside lm-eval's package). From Python, import this
module and pass ``model="cgpt"`` to ``lm_eval.simple_evaluate``, or pass a :class:`CgptLM` instance.

``pretrained`` is anything :func:`cgpt.evaluate.load_model` opens (cgpt checkpoint, run folder or
Hugging Face folder). Scoring is :func:`cgpt.evaluate.loglikelihoods` (batched) and
:func:`cgpt.evaluate.rolling_loglikelihood`; generation is greedy :func:`cgpt.generate.generate`.
This module imports without lm-eval (the class then has no lm-eval base and is not registered).
"""

from __future__ import annotations

from typing import Any

import torch

from cgpt.evaluate import encode_pair, load_model, loglikelihoods, rolling_loglikelihood

try:  # lm-eval is optional: only its base class and registry are needed
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - exercised where lm-eval is absent
    _LMBase, _register_model = object, None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


class CgptLM(_LMBase):
    """A cgpt GPT behind lm-eval's ``LM`` interface.

    Args:
        pretrained: checkpoint or folder to load (ignored when ``model`` is given).
        model: an already built :class:`cgpt.model.GPT` (or any ids -> logits module with a config).
        batch_size: requests per forward pass ("auto" means 8).
        device: torch device; default CUDA when available.
        dtype: float32, bfloat16, float16 or auto (as stored).
        max_gen_toks: default cap on generated tokens for ``generate_until``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        **unused: Any,
    ) -> None:
        if _LMBase is not object:
            super().__init__()
        from cgpt.data.tokenizer import get_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
        if model is None:
            if not pretrained:
                raise ValueError("give model_args pretrained=<cgpt checkpoint or Hugging Face folder>")
            model = load_model(pretrained, device, DTYPES[dtype])
        self.model = model.eval()
        self.tokenizer = get_tokenizer()
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.block_size = int(model.config.block_size)
        self.eot_token_id = self.tokenizer.eos_id
        self._device = next(model.parameters()).device

    # --- lm-eval's interface ------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``req.args == (context, continuation)`` -> (log P(continuation | context), is_greedy)."""
        pairs = [encode_pair(self.tokenizer, ctx, cont, self.eot_token_id) for ctx, cont in (r.args for r in requests)]
        results = loglikelihoods(self.model, pairs, self.batch_size, self.block_size)
        for r, res in zip(requests, results):
            self._cache("loglikelihood", r.args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """``req.args == (text,)`` -> log P(text | EOS), scored in windows of the model's context."""
        out = []
        for r in requests:
            (text,) = r.args[:1]
            ll = rolling_loglikelihood(self.model, self.tokenizer.encode(text), self.block_size, self.eot_token_id)
            self._cache("loglikelihood_rolling", r.args, ll)
            out.append(ll)
        return out

    @torch.inference_mode()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """``req.args == (context, gen_kwargs)``: greedy continuation cut at the first stop string."""
        from cgpt.generate import generate

        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tokenizer.encode(context)[-(self.block_size - max_new) :] if max_new < self.block_size else []
            ids = ids or [self.eot_token_id]
            max_new = min(max_new, self.block_size - len(ids))
            idx = torch.tensor([ids], device=self._device)
            seq = generate(self.model, idx, max_new, temperature=0.0, eos_id=self.eot_token_id)
            text = self.tokenizer.decode([t for t in seq[0, len(ids) :].tolist() if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self._cache("generate_until", r.args, text)
            out.append(text)
        return out

    def _cache(self, kind: str, args: Any, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)


if _register_model is not None:
    from lm_eval.api.registry import MODEL_REGISTRY

    if "cgpt" not in MODEL_REGISTRY:  # imported twice (e.g. by a test re-import) registers once
        _register_model("cgpt")(CgptLM)
