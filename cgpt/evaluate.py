"""Evaluation as the Cerebras-GPT paper did it: held-out loss and zero-shot log-likelihood tasks.

* :func:`validation_loss`: mean next-token loss and perplexity over a split of prepared shards.
* :func:`loglikelihoods`: batched log P(continuation | context) and whether greedy decoding would
  produce the continuation; the primitive of every zero-shot task (and of the lm-eval adapter).
* :func:`evaluate_multiple_choice` (HellaSwag, PIQA, ARC, WinoGrande, OpenBookQA): accuracy and
  length-normalised accuracy (log-likelihood divided by the continuation's length in characters,
  as lm-evaluation-harness's ``acc_norm``).
* :func:`evaluate_lambada`: last-word accuracy (greedy) and perplexity exp(-mean log-likelihood).

Task files are JSONL. Multiple choice: ``{"context": str, "continuations": [str, ...], "gold": int}``
(``choices``/``endings`` and ``label``/``answer`` are accepted too). LAMBADA: ``{"text": str}``; the
last space-separated word is the target. Context/continuation splitting follows lm-eval: word
boundary spaces belong to the continuation, and an empty context is replaced by the EOS token.

Models are anything that maps token ids (B, T) to logits (B, T, V): a :class:`cgpt.model.GPT`
(loaded with :func:`load_model` from a cgpt checkpoint or a Hugging Face folder) or a wrapper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cgpt.config import GPT2_EOS_ID

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class TaskFormatError(ValueError):
    """A task file is not in the expected JSONL format; the message names the file and line."""


# --- models ----------------------------------------------------------------------------------
def load_model(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A :class:`cgpt.model.GPT` in eval mode from any weights source (:func:`cgpt.weights.load_gpt`:
    a cgpt ``.ckpt``, a run folder, a sharded checkpoint folder or a Hugging Face folder)."""
    from cgpt.weights import load_gpt

    model = load_gpt(source)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def _block_size(model: Any, block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    config = getattr(model, "config", None)
    for key in ("block_size", "n_positions", "max_position_embeddings"):
        if config is not None and getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError("pass block_size: the model has no config.block_size")


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# --- log-likelihood scoring -----------------------------------------------------------------
@torch.inference_mode()
def loglikelihoods(
    model: LogitsFn,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    block_size: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log P(continuation tokens), is_greedy).

    Context and continuation are joined and the last ``block_size + 1`` tokens kept (the context
    is truncated from the left, as lm-eval does). Requests are sorted by length so that each batch
    is right-padded as little as possible; padding sits after every scored position of a row,
    so under causal attention it changes nothing. Results come back in request order.
    """
    block = _block_size(model, block_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if not ctx:
            raise ValueError(f"request {i}: empty context; prefix it with the EOS token (see encode_pair)")
        if len(cont) > block:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context of {block}")
        full = (list(ctx) + list(cont))[-(block + 1) :]
        prepared.append((full[:-1], len(cont), list(cont)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    device = _device(model)
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(prepared[chunk[0]][0])
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp = prepared[i][0]
            batch[row, : len(inp)] = torch.tensor(inp)
        logits = model(batch.to(device))  # (B, width, V)
        if not isinstance(logits, torch.Tensor):
            logits = logits.logits  # a transformers model output
        for row, i in enumerate(chunk):
            inp, n, cont = prepared[i]
            scored = F.log_softmax(logits[row, len(inp) - n : len(inp)].float(), dim=-1)  # (n, V)
            target = torch.tensor(cont, device=scored.device)
            logprob = scored.gather(1, target[:, None]).sum().item()
            greedy = bool((scored.argmax(-1) == target).all())
            results[i] = (float(logprob), greedy)
    return results  # type: ignore[return-value]


@torch.inference_mode()
def rolling_loglikelihood(
    model: LogitsFn, tokens: Sequence[int], block_size: int | None = None, prefix_id: int = GPT2_EOS_ID
) -> float:
    """log P(tokens | prefix) of a whole document, in windows of the model's context; every token
    is predicted exactly once, each window with as much context as fits (lm-eval's rolling scheme)."""
    block = _block_size(model, block_size)
    seq = [prefix_id] + list(tokens)
    total, pos = 0.0, 1  # pos: index in seq of the next token to score
    device = _device(model)
    while pos < len(seq):
        end = min(pos + block, len(seq))  # score seq[pos:end]
        begin = max(0, end - 1 - block)  # window input seq[begin:end-1], at most ``block`` tokens
        inp = torch.tensor([seq[begin : end - 1]], device=device)
        logits = model(inp)
        if not isinstance(logits, torch.Tensor):
            logits = logits.logits
        logp = F.log_softmax(logits[0].float(), dim=-1)  # (end-1-begin, V)
        targets = torch.tensor(seq[pos:end], device=device)
        rows = torch.arange(pos - 1 - begin, end - 1 - begin, device=device)
        total += logp[rows, targets].sum().item()
        pos = end
    return total


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_id: int = GPT2_EOS_ID):
    """Token ids of (context, continuation), lm-eval style: trailing spaces of the context move to
    the continuation; an empty context becomes ``[prefix_id]``."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = tokenizer.encode(context) if context else [prefix_id]
    return ctx, tokenizer.encode(continuation)


# --- tasks -----------------------------------------------------------------------------------
_CONTEXT_KEYS = ("context", "query", "ctx")
_CHOICE_KEYS = ("continuations", "choices", "endings")
_GOLD_KEYS = ("gold", "label", "answer")


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def load_task(path: str | Path, limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Read a task file: ``("multiple_choice" | "lambada", examples)``; the kind is detected from
    the keys of the first row. Raises :class:`TaskFormatError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{n}: invalid JSON ({e})") from e
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise TaskFormatError(f"{path}: no examples")
    kind = "multiple_choice" if _first(rows[0], _CHOICE_KEYS) is not None else "lambada"
    for n, row in enumerate(rows, 1):
        if kind == "lambada":
            if not isinstance(row.get("text"), str) or " " not in row["text"].strip():
                raise TaskFormatError(
                    f"{path}: example {n} needs a 'text' of at least two words (LAMBADA), or "
                    f"'context' + 'continuations' + 'gold' (multiple choice); got keys {sorted(row)}"
                )
            continue
        ctx, choices, gold = _first(row, _CONTEXT_KEYS), _first(row, _CHOICE_KEYS), _first(row, _GOLD_KEYS)
        if not isinstance(ctx, str) or not isinstance(choices, list) or len(choices) < 2:
            raise TaskFormatError(
                f"{path}: example {n} needs 'context' (str) and 'continuations' (a list of 2+ strings)"
            )
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskFormatError(f"{path}: example {n}: 'gold' must be an index into the {len(choices)} choices")
        rows[n - 1] = {"context": ctx, "continuations": [str(c) for c in choices], "gold": gold}
    return kind, rows


def multiple_choice_counts(
    model: LogitsFn,
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    batch_size: int = 8,
    block_size: int | None = None,
) -> tuple[int, int, int]:
    """(examples whose highest log-likelihood is gold, whose highest log-likelihood per character
    of the continuation is gold, examples): sums, so that shares of a task add up over ranks."""
    examples = list(examples)
    requests = [encode_pair(tokenizer, ex["context"], choice) for ex in examples for choice in ex["continuations"]]
    scores = loglikelihoods(model, requests, batch_size, block_size)
    acc = acc_norm = 0
    k = 0
    for ex in examples:
        n = len(ex["continuations"])
        ll = [s for s, _ in scores[k : k + n]]
        norm = [s / max(1, len(c)) for s, c in zip(ll, ex["continuations"])]
        acc += int(max(range(n), key=ll.__getitem__) == ex["gold"])
        acc_norm += int(max(range(n), key=norm.__getitem__) == ex["gold"])
        k += n
    return acc, acc_norm, len(examples)


def evaluate_multiple_choice(
    model: LogitsFn,
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    batch_size: int = 8,
    block_size: int | None = None,
) -> dict[str, float]:
    """Zero-shot multiple choice: ``acc`` (highest log-likelihood is gold) and ``acc_norm``
    (highest log-likelihood per character of the continuation is gold)."""
    acc, acc_norm, n = multiple_choice_counts(model, tokenizer, examples, batch_size, block_size)
    return {"acc": acc / max(1, n), "acc_norm": acc_norm / max(1, n), "examples": n}


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA: (context, " " + last word)."""
    context, word = text.rstrip().rsplit(" ", 1)
    return context, " " + word


def lambada_sums(
    model: LogitsFn,
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    batch_size: int = 8,
    block_size: int | None = None,
) -> tuple[int, float, int]:
    """(examples whose last word greedy decoding reproduces, sum of the last words'
    log-likelihoods, examples): sums, so that a task's scores add up over ranks."""
    examples = list(examples)
    requests = [encode_pair(tokenizer, *split_last_word(ex["text"])) for ex in examples]
    scores = loglikelihoods(model, requests, batch_size, block_size)
    return sum(g for _, g in scores), sum(s for s, _ in scores), len(examples)


def evaluate_lambada(
    model: LogitsFn,
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    batch_size: int = 8,
    block_size: int | None = None,
) -> dict[str, float]:
    """LAMBADA: ``acc`` (greedy decoding reproduces the last word) and ``ppl`` (exp of minus the
    mean log-likelihood of the last word), as lm-eval's lambada_openai."""
    greedy, total_ll, n = lambada_sums(model, tokenizer, examples, batch_size, block_size)
    return {"acc": greedy / max(1, n), "ppl": math.exp(-total_ll / max(1, n)), "examples": n}


def evaluate_task(
    model: LogitsFn, tokenizer: Any, path: str | Path, batch_size: int = 8, limit: int | None = None
) -> dict[str, Any]:
    """Load and score one task file (kind detected from its keys)."""
    kind, examples = load_task(path, limit)
    fn = evaluate_multiple_choice if kind == "multiple_choice" else evaluate_lambada
    return {"task": Path(path).stem, "kind": kind, **fn(model, tokenizer, examples, batch_size)}


# --- held-out loss ---------------------------------------------------------------------------
@torch.inference_mode()
def validation_loss(
    model: LogitsFn,
    data_dir: str | Path,
    split: str = "val",
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    shard_url: str | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) and perplexity over ``split`` of the prepared shards in
    ``data_dir`` (every sample in file order, or the first ``max_batches`` micro-batches)."""
    import numpy as np
    import webdataset as wds

    from cgpt.data.shards import DatasetMeta, iter_tar_samples

    meta = DatasetMeta.load(data_dir)
    urls = [
        shard_url.format(name=s["name"]) if shard_url else str(Path(data_dir) / s["name"]) for s in meta.shards(split)
    ]
    block = _block_size(model, None)
    if meta.seq_len > block:
        raise ValueError(f"{data_dir}: sequences of {meta.seq_len} tokens exceed the model's context of {block}")
    device = _device(model)
    total_loss, tokens, batches = 0.0, 0, 0

    def batches_of_samples():
        pending = []
        for url in urls:
            with wds.gopen(url, "rb") as stream:
                for sample in iter_tar_samples(stream, url, meta.sample_len):
                    pending.append(sample)
                    if len(pending) == micro_batch_size:
                        yield np.stack(pending)
                        pending = []
        if pending:
            yield np.stack(pending)

    for rows in batches_of_samples():
        rows = torch.from_numpy(rows.astype(np.int64)).to(device)  # (B, seq_len + 1)
        logits = model(rows[:, :-1])
        if not isinstance(logits, torch.Tensor):
            logits = logits.logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        total_loss += loss.item()
        tokens += rows[:, 1:].numel()
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    if not tokens:
        raise ValueError(f"{data_dir}: split {split!r} has no readable samples")
    mean = total_loss / tokens
    return {"loss": mean, "ppl": math.exp(mean), "tokens": tokens, "batches": batches}
