"""Zero-shot tasks scored during training: the task files of ``train/evaluate.py --tasks``, every
N validations, logged as ``eval/<task>/acc`` and ``eval/<task>/acc_norm`` (LAMBADA: ``acc`` and
``ppl``).

Every rank scores its share of each task's examples (rank ``r`` of ``W`` takes examples ``r``,
``r + W``, ...) and the counts are summed over ranks, so the scores equal a single process's. Under
sharded strategies (FSDP, ZeRO-3) a forward pass gathers parameters from every rank, so all ranks
must run as many forward passes: a rank with fewer batches runs one-token passes until it has run
as many as the busiest rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cgpt.config import ConfigError
from cgpt.evaluate import lambada_sums, load_task, multiple_choice_counts


class _CountedForward(torch.nn.Module):
    """The model, counting its forward passes (the evaluation functions see its config and device)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(idx)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values


def score_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[tuple[str, str, list[dict[str, Any]]]],
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Score ``(name, kind, examples)`` tasks with this rank's share of the examples and sum the
    counts over ranks (a collective: every rank calls it). Returns ``{task: {acc, acc_norm | ppl,
    examples}}``, equal to :func:`cgpt.evaluate.evaluate_task` of one process on all examples."""
    rank, world = _world()
    counted = _CountedForward(model)
    device = next(model.parameters()).device
    sums = []
    for _, kind, examples in tasks:
        mine = examples[rank::world]
        if not mine:
            sums.append((0.0, 0.0, 0.0))
        elif kind == "multiple_choice":
            sums.append(tuple(map(float, multiple_choice_counts(counted, tokenizer, mine, batch_size))))
        else:
            sums.append(tuple(map(float, lambada_sums(counted, tokenizer, mine, batch_size))))
    calls = _all_reduce(torch.tensor([counted.calls], device=device), "max")
    with torch.inference_mode():
        for _ in range(int(calls.item()) - counted.calls):  # keep step with the ranks that had more batches
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
    total = _all_reduce(torch.tensor(sums, dtype=torch.float64, device=device), "sum").tolist()
    results = {}
    for (name, kind, _), (a, b, n) in zip(tasks, total, strict=True):
        if kind == "multiple_choice":
            results[name] = {"acc": a / max(1, n), "acc_norm": b / max(1, n), "examples": int(n)}
        else:
            results[name] = {"acc": a / max(1, n), "ppl": math.exp(-b / max(1, n)), "examples": int(n)}
    return results


class ZeroShotEval(L.Callback):
    """Score zero-shot task files every ``every_n_validations`` validations (sanity checks do not
    count), log ``eval/<task>/<metric>``, and print the scores with the time they took (rank 0).

    Args:
        tasks: task JSONL files (multiple choice or LAMBADA, as ``train/evaluate.py --tasks``); the
            task name is the file name without ``.jsonl``. Read (and checked) here, before training.
        every_n_validations: validations between two scorings (1: every validation).
        batch_size: sequences per forward pass.
        limit: the first N examples of each task (None: all).
    """

    def __init__(
        self, tasks: Sequence[str], every_n_validations: int = 1, batch_size: int = 8, limit: int | None = None
    ) -> None:
        if every_n_validations < 1 or batch_size < 1:
            raise ConfigError(
                f"eval.every_n_validations ({every_n_validations}) and eval.batch_size ({batch_size}) must be >= 1"
            )
        names = [Path(p).name.removesuffix(".jsonl") for p in tasks]
        if len(set(names)) < len(names):
            raise ConfigError(f"eval.tasks: two task files have the same name in {list(tasks)}; rename one")
        self.tasks = [(name, *load_task(p, limit)) for name, p in zip(names, tasks, strict=True)]
        self.every = every_n_validations
        self.batch_size = batch_size
        self.validations = 0  # saved in checkpoints, so a resumed run keeps the rhythm
        self.results: dict[str, dict[str, float]] = {}
        self.step: int | None = None  # the optimizer step of the latest scores
        self.seconds = 0.0  # what the latest scoring took

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every:
            return
        from cgpt.data.tokenizer import get_tokenizer

        start = time.perf_counter()
        self.results = score_tasks(pl_module.model, get_tokenizer(), self.tasks, self.batch_size)
        self.seconds, self.step = time.perf_counter() - start, trainer.global_step
        for task, scores in self.results.items():
            for metric, value in scores.items():
                if metric != "examples":
                    pl_module.log(f"eval/{task}/{metric}", torch.tensor(value, dtype=torch.float64), sync_dist=False)
        if trainer.is_global_zero:
            parts = [
                f"{task} " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if k != "examples")
                for task, s in self.results.items()
            ]
            print(f"step {trainer.global_step}: zero-shot {' | '.join(parts)} ({self.seconds:.1f} s)", flush=True)

    def summary(self) -> dict[str, Any]:
        """The latest scores for summary.json: ``{step, seconds, tasks: {task: scores}}``."""
        return {"step": self.step, "seconds": self.seconds, "tasks": self.results}

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
