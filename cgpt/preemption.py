"""Time limits and preemption: checkpoint at a step boundary on a signal, then requeue.

The one mechanism for SLURM jobs (Lightning's own auto-requeue is switched off in cgpt.training):

1. A signal (SIGUSR1 from ``sbatch --signal=USR1@N``, or SIGTERM) only sets a flag; nothing heavy
   runs inside the handler, so no collective is interrupted half-way.
2. After the next optimizer step, all ranks agree (any rank signalled -> all stop), save
   ``<checkpoints>/last.ckpt`` atomically (AtomicCheckpointIO) and stop training.
3. :meth:`PreemptionHandler.requeue_or_exit` (called by :func:`cgpt.training.fit` once ``fit`` has returned and
   the loggers are closed) runs ``scontrol requeue $SLURM_JOB_ID`` on rank 0 and exits. The requeued
   job runs the same command, which resumes from last.ckpt and continues the W&B run whose id is
   kept in the output folder. Outside SLURM it exits with :data:`EXIT_PREEMPTED`; re-running resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

from cgpt.slurm import requeue_job_id
from cgpt.startup import close_wandb_run
from cgpt.weights import LAST

# Exit status of a run that stopped on a signal after saving its checkpoint (re-run to resume).
EXIT_PREEMPTED = 3


class PreemptionHandler(L.Callback):
    """Saves ``dirpath/last.ckpt`` at the first optimizer-step boundary after one of ``signals``.

    Args:
        dirpath: checkpoint folder (the one ``resume=auto`` reads).
        signals: signal names to catch.
        requeue: under SLURM, requeue the job after saving (else only exit).
    """

    def __init__(self, dirpath: str, signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGTERM"),
                 requeue: bool = True) -> None:  # fmt: skip
        self.dirpath = Path(dirpath)
        self.signals = [_signal(name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.received_at: float | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}
        self.install()  # before fit: a signal during start-up is remembered, not fatal

    @property
    def stopped(self) -> bool:
        """True once the run saved its checkpoint and stopped because of a signal."""
        return self.saved_step is not None

    def install(self) -> None:
        """(Re)install the flag-setting handler for each signal (replacing Lightning's SIGTERM handler)."""
        for sig in self.signals:
            previous = signal.signal(sig, self.handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Put back the handlers found before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler: remember the first signal (the work happens at the next step boundary)."""
        if self.received is None:
            self.received, self.received_at = signum, time.time()
            name = signal.Signals(signum).name
            print(f"received {name}: checkpointing at the next step", file=sys.stderr, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # Lightning registered its own SIGTERM handler after we were built

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.stopped or trainer.fit_loop._should_accumulate():
            return
        # Ranks get the signal at slightly different times: stop together when any rank has it.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if self.received == signal.SIGTERM:
            # SLURM sent SIGTERM to the whole step, W&B's service process included, which exits on it:
            # log nothing more to W&B (the resumed run continues it), or the next log call raises.
            trainer.loggers = [lg for lg in trainer.loggers if type(lg).__name__ != "WandbLogger"]
        path = self.dirpath / LAST
        trainer.save_checkpoint(path)
        self.saved_step = trainer.global_step
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates when a run stops early: no time for that now
        if trainer.is_global_zero:
            print(f"preempted: saved {path} at step {trainer.global_step}", flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.stopped:
            self.restore()

    def requeue_or_exit(self, is_global_zero: bool) -> None:
        """After a preempted ``fit``: close W&B, requeue the SLURM job (rank 0), and exit."""
        close_wandb_run(EXIT_PREEMPTED, then="requeueing anyway")  # its files complete before SLURM kills the job
        job = requeue_job_id()
        if self.requeue and job and is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
            if result.returncode:
                print(f"scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr, flush=True)
            else:
                print(f"requeued SLURM job {job}", flush=True)
        raise SystemExit(EXIT_PREEMPTED)


def leave_signals_to_main_process(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores the preemption signals.

    SLURM signals every process of a job step (SIGTERM on preemption or ``scancel --signal=TERM``,
    USR1 before the time limit), data workers included, and PyTorch's workers die on SIGTERM; the
    main process would then fail fetching the next batch instead of saving at the step boundary.
    The main process alone acts on the signal and shuts its workers down as usual. Also seeds the
    worker as Lightning does after ``seed_everything(workers=True)`` (which it skips when a loader
    has its own ``worker_init_fn``).
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def _signal(name: str | int) -> signal.Signals:
    try:
        return signal.Signals[name] if isinstance(name, str) else signal.Signals(name)
    except (KeyError, ValueError) as e:
        raise ValueError(f"preemption.signals: unknown signal {name!r} (use names such as SIGUSR1)") from e
