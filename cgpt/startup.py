"""What an entry point does around its run: before its heavy imports, hold SLURM's early signals,
quiet known noise, make a native crash print where Python was, and import torch and Lightning
without paying for the garbage collector (:func:`heavy_imports`); after a distributed run that
succeeded, end the process without the interpreter's teardown (:func:`finish_process`).

Only the standard library is imported here, so an entry point can call :func:`hold_signals` in its
first lines, before torch and Lightning take seconds to import.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_HELD: list[int] = []
_HOLDABLE = ("SIGUSR1",)


def hold_signals() -> None:
    """Remember SLURM's USR1 (time limit near) instead of dying from it during start-up.

    :class:`cgpt.preemption.PreemptionHandler` acts on a held signal at the first training step
    (:func:`cgpt.training.build` hands them over); a run without preemption handling restores the
    default action.
    """
    for name in _HOLDABLE:
        signal.signal(getattr(signal, name), lambda signum, _frame: _HELD.append(signum))


def held_signals() -> list[int]:
    """The signals received since :func:`hold_signals`, oldest first."""
    return list(_HELD)


def release_signals() -> None:
    """Give the held signals their default action back (a run that does not handle preemption)."""
    for name in _HOLDABLE:
        signal.signal(getattr(signal, name), signal.SIG_DFL)


# Lightning's info lines that say nothing a cgpt user can act on: an advertisement, accelerators
# the run does not use, and the precision (cgpt's own first lines say which and why).
LIGHTNING_NOISE = (
    "💡 Tip:",
    "GPU available: False",
    "TPU available:",
    "HPU available:",
    "Using bfloat16 Automatic Mixed Precision",
    "Using 16bit Automatic Mixed Precision",
)
# Lightning's rank-zero messages come from these loggers (the pytorch one in a training run).
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropPrefixes(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence third-party messages a cgpt user cannot act on; never warnings about their own config.

    Called by the entry points only (:func:`prepare_entry_point`), so a library user of cgpt keeps
    every message. Each filter matches one known message, never a whole category or module:

    - Lightning hints "srun is available but not used" wherever the SLURM client is installed;
      outside a job (a laptop or login node) that is noise. Inside a job it stays.
    - Lightning's ``_pytree`` calls ``isinstance(x, LeafSpec)``, which recent torch deprecates
      (a FutureWarning about Lightning's code, printed on every run).
    - Lightning's info lines in :data:`LIGHTNING_NOISE`: the litlogger advertisement, "GPU
      available: False" and TPU/HPU lines, and its AMP line (cgpt prints the precision with why).
    """
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message="The `srun` command is available")
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(LIGHTNING_NOISE))


def follow_output_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``hydra.run.dir`` set to an overridden ``paths.output_dir``.

    The composed config's record (``<run dir>/hydra/``) belongs beside the run's outputs; without
    this, ``paths.output_dir=/runs/x`` trains into ``/runs/x`` but records the config under
    ``outputs/<run_name>/hydra/``, where runs of the same name overwrite each other's record.
    Multirun points keep one folder each (``hydra.sweep``), so they are left alone.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return list(argv)
    given = [a.split("=", 1)[1] for a in argv if a.startswith(("paths.output_dir=", "++paths.output_dir="))]
    return list(argv) + [f"hydra.run.dir={given[-1]}"] if given else list(argv)


def prepare_entry_point(root: str | os.PathLike) -> None:
    """The first call of a training entry point: hold early signals, quiet known noise, have a native
    crash print the Python stacks of every thread (:func:`faulthandler.enable`: an abort in a C++
    library, e.g. a communication thread at exit, then names the Python frames it happened under
    instead of leaving one line), point the configs' ``${oc.env:CGPT_ROOT}`` at the project ``root``
    (unless set), and make Hydra's record of the config follow ``paths.output_dir`` (rewrites
    ``sys.argv`` in place)."""
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    hold_signals()
    quiet_third_party()
    os.environ.setdefault("CGPT_ROOT", str(root))
    sys.argv[:] = follow_output_dir(sys.argv)


_FROZEN = False  # heavy_imports has frozen this process's import-time objects


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch, Lightning and what they pull in with the cyclic garbage collector paused, then
    move every object alive at that point out of all later collections (``gc.freeze``).

    Those imports leave about 700,000 objects for the collector to track and almost no garbage,
    yet its full passes walk the growing heap again and again (a third of the import's CPU time),
    and Python's collections at exit walk it once more (seconds per process on a busy CPU). The
    frozen objects are modules, classes and functions that live until exit anyway; what a run
    creates afterwards (about 14,000 tracked objects in a tiny run) is collected as usual.

    Once per process: a Hydra multirun calls the entry point's main again in the same process, and
    freezing then would keep the previous job's model and trainer (garbage in reference cycles)
    for good. The garbage made before the first call (Hydra's composition) is collected first, for
    the same reason. Entry points only: a library user's process keeps its own collector settings.
    """
    global _FROZEN
    if _FROZEN:
        yield
        return
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        _FROZEN = True
        if enabled:
            gc.enable()


def close_wandb_run(exit_code: int, then: str) -> None:
    """Flush and close an active W&B run, so its files are complete before the process ends. Its
    service may already be gone (killed by the same SIGTERM as the job): say so, and go on (``then``)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as e:
            print(f"W&B run not closed cleanly ({type(e).__name__}: {e}); {then}", file=sys.stderr, flush=True)


_DISTRIBUTED_RUN_DONE = False  # this process trained as a rank and tore its process group down


def mark_distributed_run_done() -> None:
    """Called once a rank's run has succeeded and its process group is gone (see :func:`finish_process`)."""
    global _DISTRIBUTED_RUN_DONE
    _DISTRIBUTED_RUN_DONE = True


def finish_process() -> None:
    """The last call of an entry point: after a distributed run that succeeded, end the process
    without the interpreter's teardown.

    A rank's run is over once every collective is done, the checkpoints and summary are written and
    the process group is destroyed. What is left is the interpreter destroying torch's, gloo's and
    DeepSpeed's native objects in no set order, and that can abort a rank that trained correctly
    (seen once in a ZeRO-3 offload run under torchrun: SIGABRT, "terminate called without an active
    exception"; 42 runs of the same command did not repeat it). torchrun and srun report any rank's
    abort as a failed job, and a failed job is requeued. So the entry point closes what must be closed itself (a W&B
    run, DataLoader workers, the log handlers, stdout and stderr) and exits with ``os._exit(0)``.
    Anything else (a failed run, a single-process run, a library caller) returns as usual.
    """
    if not _DISTRIBUTED_RUN_DONE:
        return
    close_wandb_run(0, then="exiting all the same")
    for child in multiprocessing.active_children():  # DataLoader workers of the last validation
        child.terminate()
        child.join(timeout=5)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
