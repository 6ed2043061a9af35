"""Training callbacks: throughput and MFU, plain-text progress lines, and the run summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cgpt.hardware import peak_flops, precision_dtype


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class ThroughputMonitor(L.Callback):
    """Logs ``tokens_per_sec`` and ``mfu`` (model FLOPs / device peak) every ``log_every`` steps.

    Reads time only at the logging steps, so it adds no host-device synchronisation to the others.
    The first window starts at the end of the first step, so compilation and warm-up stay out of it.
    The peak is the device's in the training precision (:func:`cgpt.hardware.peak_flops`: the
    table for GPUs, a measured matmul on CPUs); FLOPs per token come from
    :meth:`cgpt.config.ModelConfig.flops_per_token` at the training sequence length.
    """

    def __init__(self, log_every: int = 10, peak_flops_per_device: float | None = None) -> None:
        self.log_every = log_every
        self.peak = peak_flops_per_device
        self._t0: float | None = None
        self._step0 = 0
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak is None:
            self.peak = peak_flops(pl_module.device, precision_dtype(trainer.precision))
        self._t0, self._step0 = None, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._step0:
            return
        if self._t0 is None:  # end of the first step: start timing here
            self._t0, self._step0 = _synced_time(pl_module.device), step
            return
        if step % self.log_every:
            return
        now = _synced_time(pl_module.device)
        tokens = (step - self._step0) * pl_module.tokens_per_step
        self.tokens_per_sec = tokens / max(now - self._t0, 1e-9)
        flops_per_token = pl_module.model_config.flops_per_token(_seq_len(trainer, pl_module))
        self.mfu = self.tokens_per_sec * flops_per_token / (self.peak * trainer.world_size)
        # CPU tensors: logging a Python float on a GPU would be one more host-to-device copy.
        pl_module.log("tokens_per_sec", torch.tensor(self.tokens_per_sec, dtype=torch.float64), rank_zero_only=True)
        pl_module.log("mfu", torch.tensor(self.mfu, dtype=torch.float64), rank_zero_only=True)
        self._t0, self._step0 = now, step


def _synced_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _seq_len(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """The training sequence length: the module's runtime value, else the datamodule's (else None: block_size)."""
    return getattr(pl_module, "seq_len", None) or getattr(trainer.datamodule, "seq_len", None)


class ProgressPrinter(L.Callback):
    """Training progress on rank 0: a progress bar (loss, tokens/s, ETA) when the output is a terminal,
    else one plain line every ``every`` steps (log files, SLURM); validation results either way.

    Args:
        every: steps between plain lines.
        bar: ``"auto"`` (a bar when the output is a terminal), ``true`` or ``false``.
        stream: ``"stdout"`` or ``"stderr"`` (a benchmark keeps stdout for its results).
    """

    def __init__(self, every: int = 50, bar: str | bool = "auto", stream: str = "stdout") -> None:
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"ProgressPrinter(stream={stream!r}): use 'stdout' or 'stderr'")
        self.every = every
        self.bar = bar
        self.stream = stream
        self._start = 0.0
        self._step0 = 0
        self._bar: Any = None

    def _stream(self) -> Any:
        return getattr(sys, self.stream)  # looked up at each write: pytest and tqdm swap these

    def _print(self, trainer: L.Trainer, msg: str) -> None:
        if not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self._stream())
        else:
            print(msg, file=self._stream(), flush=True)

    def _use_bar(self) -> bool:
        if self.bar == "auto":
            return self._stream().isatty()
        return bool(self.bar)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._step0 = time.time(), trainer.global_step
        # From the config: under ZeRO-3 the module's own tensors are this rank's partitions.
        n = pl_module.model_config.num_params()
        self._print(
            trainer, f"training {pl_module.model_config.name}: {n / 1e6:.2f}M parameters, {trainer.max_steps} steps"
        )
        if trainer.is_global_zero and self._use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", file=self._stream(),
                             dynamic_ncols=True, desc="train")  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._bar is not None:
            if step > self._bar.n:
                m = trainer.callback_metrics
                post = {}
                if "train/loss" in m:
                    post["loss"] = f"{_scalar(m['train/loss']):.4f}"
                if "tokens_per_sec" in m:
                    post["tok/s"] = f"{_scalar(m['tokens_per_sec']):,.0f}"
                if post:
                    self._bar.set_postfix(post, refresh=False)
                self._bar.update(step - self._bar.n)
            return
        if step % self.every or step == 0 or trainer.fit_loop._should_accumulate():
            return
        m = trainer.callback_metrics
        elapsed = time.time() - self._start
        eta = elapsed / max(step - self._step0, 1) * (trainer.max_steps - step)  # this run's pace (resumes too)
        parts = [f"step {step}/{trainer.max_steps}"]
        if "train/loss" in m:
            parts.append(f"loss {_scalar(m['train/loss']):.4f}")
        if "lr" in m:
            parts.append(f"lr {_scalar(m['lr']):.2e}")
        if "tokens_per_sec" in m:
            parts.append(f"{_scalar(m['tokens_per_sec']):,.0f} tok/s")
        if "mfu" in m:
            parts.append(f"mfu {100 * _scalar(m['mfu']):.1f}%")
        parts.append(f"eta {eta / 60:.1f} min")
        self._print(trainer, " | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = _scalar(trainer.callback_metrics["val/loss"])
        line = f"step {trainer.global_step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})"
        per_source = source_losses(trainer.callback_metrics)
        if per_source:
            line += " | " + ", ".join(f"{name} {value:.4f}" for name, value in per_source.items())
        self._print(trainer, line)
        ledger = _mixture_ledger(trainer)
        if ledger:  # where each source of a mixture stands: also logged, as data/epochs/<source>
            self._print(trainer, "data epochs: " + ", ".join(f"{n} {r['epochs_float']:.3f}" for n, r in ledger.items()))
            for lg in trainer.loggers if trainer.is_global_zero else ():
                lg.log_metrics({f"data/epochs/{n}": r["epochs_float"] for n, r in ledger.items()}, trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def source_losses(metrics: dict[str, Any]) -> dict[str, float]:
    """The validation loss of each source (``val/loss/<source>``) in logged ``metrics``."""
    prefix = "val/loss/"
    return {k[len(prefix) :]: _scalar(v) for k, v in metrics.items() if k.startswith(prefix)}


def _mixture_ledger(trainer: L.Trainer) -> dict[str, dict[str, float]] | None:
    """Samples and epochs per source of a mixture so far (cgpt.data.datamodule.PackedDataModule)."""
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.mixture_ledger() if hasattr(datamodule, "mixture_ledger") else None


def _zero_shot(trainer: L.Trainer) -> dict[str, Any]:
    """``{"zero_shot": latest scores}`` when the run scores zero-shot tasks (cgpt.zero_shot), else {}."""
    from cgpt.zero_shot import ZeroShotEval

    found = [c for c in trainer.callbacks if isinstance(c, ZeroShotEval)]
    return {"zero_shot": found[0].summary()} if found else {}


def _watchdog(trainer: L.Trainer) -> dict[str, Any]:
    """``{"watchdog": its section}``: the hang watchdog's limit and stragglers (cgpt.watchdog), or
    ``{"enabled": false}`` when the run has none."""
    from cgpt.watchdog import HangWatchdog

    found = [c for c in trainer.callbacks if isinstance(c, HangWatchdog)]
    return {"watchdog": found[0].summary() if found else {"enabled": False}}


def _bad_shards(datamodule: Any) -> int:
    """Unreadable shards the data module skipped, over all ranks (a collective: every rank calls it)."""
    if hasattr(datamodule, "bad_shards_all_ranks"):
        return datamodule.bad_shards_all_ranks()
    return getattr(datamodule, "bad_shards", 0)


class RunSummary(L.Callback):
    """Collects what a run did and writes ``summary.json`` (rank 0 only) when :meth:`write` is
    called: final losses, steps, tokens, speed, wall time, and the resolved config."""

    def __init__(self, path: str, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.config = config or {}
        self._start = time.time()
        self._step0 = 0
        self.last_val_step: int | None = None
        self.last_train_loss: Any = None  # kept here: a later trainer.validate() resets callback_metrics
        self.summary: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step0 = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_train_loss = trainer.callback_metrics.get("train/loss")

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, **extra: Any) -> dict[str, Any]:
        m = trainer.callback_metrics
        wall = time.time() - self._start
        steps_run = trainer.global_step - self._step0
        throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        measured = throughput.tokens_per_sec if throughput is not None else None
        self.summary = {
            "train_loss": _scalar(m.get("train/loss", self.last_train_loss)),
            "val_loss": _scalar(m.get("val/loss")),
            "val_ppl": _scalar(m.get("val/ppl")),
            "val_loss_per_source": source_losses(m),
            "steps": trainer.global_step,
            "steps_this_run": steps_run,
            "tokens_seen": trainer.global_step * pl_module.tokens_per_step,
            "tokens_per_sec": measured or steps_run * pl_module.tokens_per_step / max(wall, 1e-9),
            "mfu": throughput.mfu if throughput is not None else None,
            "wall_time_sec": wall,
            "num_params": pl_module.model.num_params() if pl_module.model is not None else None,
            "bad_shards_skipped": _bad_shards(trainer.datamodule),
            **_zero_shot(trainer),
            **_watchdog(trainer),
            **({"data_sources": ledger} if (ledger := _mixture_ledger(trainer)) else {}),
            **extra,
            "config": self.config,
        }
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)
        return self.summary
