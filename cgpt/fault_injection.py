"""Fault injection for tests of :mod:`cgpt.guard` and :mod:`cgpt.watchdog`. Never part of a normal run.

Nothing in ``conf/`` refers to it: it acts only when a test adds it explicitly, e.g.
``+callbacks.fault={_target_: cgpt.fault_injection.FaultInjector, kind: nan_loss, step: 3, rank: 1}``.

Kinds (on rank ``rank`` only, during optimizer step ``step``, counted from 1 as the progress lines do):

- ``nan_loss``: the loss of each micro-batch of that step is multiplied by NaN (loss and gradients NaN);
- ``scale_loss``: the loss is multiplied by ``factor`` (a spike, with gradients ``factor`` times larger);
- ``sleep``: the training step sleeps ``seconds`` (a hung or straggling rank);
- ``pause``: the training step prints ``fault injection: paused at step S`` and waits until the file
  ``release`` exists (at most ``seconds``), so a test can act at a known step (send a signal, take a
  SLURM node down) and then let the run go on. A run that reaches the step again after ``release``
  was created (a resumed one) does not wait.

With ``record_dir`` set, every rank writes ``weights-rank<R>-step<S>.pt`` (its local parameter shards
after steps ``step - 1``, ``step`` and ``step + 1``) and, at the end, ``decisions-rank<R>.json`` (the
steps its guard dropped), so a test can check what each rank did.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

KINDS = ("nan_loss", "scale_loss", "sleep", "pause")


class FaultInjector(L.Callback):
    """See the module docstring."""

    def __init__(self, kind: str, step: int, rank: int = 1, factor: float = 100.0, seconds: float = 60.0,
                 record_dir: str | None = None, release: str | None = None) -> None:  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"FaultInjector(kind={kind!r}): use one of {KINDS}")
        if kind == "pause" and not release:
            raise ValueError("FaultInjector(kind='pause') needs release=<file the test creates to resume>")
        self.release = Path(release) if release else None
        self.kind, self.step, self.rank = kind, int(step), int(rank)
        self.factor, self.seconds = float(factor), float(seconds)
        self.record_dir = Path(record_dir) if record_dir else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        original = pl_module.training_step
        injector = self

        def training_step(batch: Any, batch_idx: int) -> torch.Tensor:
            loss = original(batch, batch_idx)
            if trainer.global_rank != injector.rank or trainer.global_step + 1 != injector.step:
                return loss
            if injector.kind == "nan_loss":
                return loss * math.nan
            if injector.kind == "scale_loss":
                return loss * injector.factor
            if injector.kind == "pause":
                _pause(injector.release, injector.step, injector.seconds)
                return loss
            _sleep(injector.seconds)
            return loss

        pl_module.training_step = training_step  # an instance attribute: Lightning's wrappers call it
        if self.record_dir is not None and trainer.global_step == self.step - 1:  # before the step
            self._record(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.record_dir is None or trainer.fit_loop._should_accumulate():
            return
        if trainer.global_step in (self.step - 1, self.step, self.step + 1):
            self._record(trainer, pl_module, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record_dir is None:
            return
        guard = next((c for c in trainer.callbacks if hasattr(c, "decide") and hasattr(c, "events")), None)
        skipped = [e["step"] for e in guard.events] if guard is not None else None
        path = self.record_dir / f"decisions-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"skipped": skipped, "steps": trainer.global_step}))

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        shards = {name: _local(p).detach().float().cpu().clone() for name, p in pl_module.named_parameters()}
        torch.save(shards, self.record_dir / f"weights-rank{trainer.global_rank}-step{step}.pt")


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's own part of a parameter: the FSDP2 shard, the ZeRO-3 partition, or the whole tensor."""
    if hasattr(p, "to_local"):
        return p.to_local()
    return getattr(p, "ds_tensor", p)


def _pause(release: Path, step: int, seconds: float) -> None:
    if release.exists():
        return
    print(f"fault injection: paused at step {step}", flush=True)
    deadline = time.monotonic() + seconds
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # the frame the watchdog test looks for in the stack dump
