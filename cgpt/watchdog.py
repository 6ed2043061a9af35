"""The hang watchdog: a run that stops making progress leaves stack dumps, not a dead allocation.

Each rank runs a daemon thread that watches the time since its last sign of progress (a training
micro-batch starting or ending, a backward, an optimizer step, a validation batch, a checkpoint
save). When it exceeds ``timeout_s``, the rank:

1. writes ``<run folder>/hang/rank<R>.txt``: a header (rank, pid, host, last completed step, the
   phase it is in) and the Python stacks of all its threads (:func:`faulthandler.dump_traceback`);
2. on rank 0 only, waits up to ``grace_s`` for the other ranks' files and writes
   ``hang/report.txt`` (also printed): for each rank where it stands and its innermost frame, and
   which ranks reached the furthest point (where they wait for the others, typically a collective)
   and which did not. A rank with no file is dead or frozen in C code holding the interpreter lock;
3. with ``exit: true``, exits with :data:`EXIT_HUNG`, so a SLURM requeue (or a re-run of the same
   command) resumes from the last checkpoint instead of burning the allocation.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L

from cgpt.config import ConfigError

# Exit status of a run the watchdog ended (re-run the same command to resume from the last checkpoint).
EXIT_HUNG = 5
PHASES = ("forward", "backward", "optimizer step", "micro-batch done")


class HangWatchdog(L.Callback):
    """Dumps every thread's stack (and, configurably, exits) when no progress is made for ``timeout_s``.

    Args:
        dirpath: the run folder; dumps go to ``dirpath/hang/``.
        timeout_s: seconds without progress before the watchdog fires.
        exit: exit with :data:`EXIT_HUNG` after the dumps (else training is left to hang on).
        grace_s: how long rank 0 waits for the other ranks' dumps before writing its report.
    """

    def __init__(self, dirpath: str, timeout_s: float = 1800.0, exit: bool = True, grace_s: float = 15.0) -> None:
        if timeout_s <= 0 or grace_s < 0:
            raise ConfigError(f"watchdog.timeout_s={timeout_s} must be positive and grace_s={grace_s} >= 0")
        self.folder = Path(dirpath) / "hang"
        self.timeout_s = float(timeout_s)
        self.exit = exit
        self.grace_s = float(grace_s)
        self.fired = False
        self._beat = time.monotonic()
        self._where: tuple[int, int, int] = (0, 0, -1)  # (micro-batches started, phase index, completed steps)
        self._rank, self._world = 0, 1
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- progress signs ------------------------------------------------------------------------
    def _progress(self, phase: int, step: int, new_micro_batch: bool = False) -> None:
        micro = self._where[0] + int(new_micro_batch)
        self._where = (micro, phase, step)
        self._beat = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._started = time.time() - 1.0  # file times are compared with it (1 s: coarse file-system clocks)
        self._progress(len(PHASES) - 1, trainer.global_step)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="cgpt-hang-watchdog", daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(0, trainer.global_step, new_micro_batch=True)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(1, trainer.global_step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(2, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(3, trainer.global_step)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._beat = time.monotonic()

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        self._beat = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop.set()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()

    # --- firing --------------------------------------------------------------------------------
    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self._beat > self.timeout_s:
                self.fire()
                return

    def fire(self) -> None:
        """Dump this rank's stacks, report (rank 0), and exit when configured to."""
        self.fired = True
        idle = time.monotonic() - self._beat
        micro, phase, step = self._where
        header = {"rank": self._rank, "pid": os.getpid(), "host": socket.gethostname(), "idle_s": round(idle, 1),
                  "completed_steps": step, "micro_batch": micro, "phase": PHASES[phase],
                  "main_thread": f"0x{threading.main_thread().ident:016x}"}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self._rank}.txt"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(tmp, path)  # complete files only: rank 0 reads them
        msg = (f"watchdog: rank {self._rank}: no progress for {idle:.0f}s (watchdog.timeout_s={self.timeout_s:g}) "
               f"in {PHASES[phase]} after step {step}; stacks of all threads: {path}")  # fmt: skip
        print(msg, file=sys.stderr, flush=True)
        if self._rank == 0:
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and not self._all_dumped():
                time.sleep(0.2)
            report = hang_report(self.folder, self._world, self._started)
            (self.folder / "report.txt").write_text(report)
            print(report, file=sys.stderr, flush=True)
        elif self.exit:  # stay until rank 0 has reported: exiting closes the connections its dump waits behind
            deadline = time.monotonic() + self.timeout_s + 2 * self.grace_s
            while time.monotonic() < deadline and not self._fresh(self.folder / "report.txt"):
                time.sleep(0.2)
        if self.exit:
            if self._rank == 0:
                print(f"watchdog: exiting with code {EXIT_HUNG}; re-run the same command to resume from the last "
                      "checkpoint", file=sys.stderr, flush=True)  # fmt: skip
            sys.stdout.flush()
            os._exit(EXIT_HUNG)

    def _all_dumped(self) -> bool:
        return all(self._fresh(self.folder / f"rank{r}.txt") for r in range(self._world))

    def _fresh(self, path: Path) -> bool:
        """Written by this run (not left by an earlier hang in the same folder)."""
        return path.exists() and path.stat().st_mtime >= self._started


def read_dump(path: Path) -> tuple[dict[str, Any], str | None]:
    """A rank's dump: its header and the innermost frame of its main thread (``file:line in function``)."""
    text = path.read_text()
    first, _, stacks = text.partition("\n")
    header = json.loads(first)
    frame = None
    block = re.search(rf"Thread {header['main_thread']}[^\n]*\n((?:  File [^\n]*\n)+)", stacks)
    if block:
        m = re.match(r'  File "([^"]+)", line (\d+) in (\S+)', block.group(1))
        if m:
            frame = f"{Path(m.group(1)).name}:{m.group(2)} in {m.group(3)}"
    return header, frame


def hang_report(folder: Path, world: int, since: float = 0.0) -> str:
    """Where each rank stands, and which reached the point the furthest ranks wait at (dumps written
    since ``since``, a wall-clock time, count)."""
    paths = {r: folder / f"rank{r}.txt" for r in range(world)}
    dumps = {r: read_dump(p) for r, p in paths.items() if p.exists() and p.stat().st_mtime >= since}
    lines = [f"watchdog report ({len(dumps)} of {world} ranks dumped their stacks into {folder}):"]

    def key(header: dict[str, Any]) -> tuple[int, int]:
        return header["micro_batch"], PHASES.index(header["phase"])

    furthest = max((key(h) for h, _ in dumps.values()), default=None)
    for r in range(world):
        if r not in dumps:
            lines.append(f"  rank {r}: no dump (dead, or frozen in C code holding the interpreter lock)")
            continue
        h, frame = dumps[r]
        status = "reached the furthest point (waiting there)" if key(h) == furthest else "did NOT reach it"
        lines.append(f"  rank {r}: {h['phase']} of micro-batch {h['micro_batch']} after step {h['completed_steps']}, "
                     f"idle {h['idle_s']}s, innermost frame {frame}: {status}")  # fmt: skip
    behind = [r for r in range(world) if r not in dumps or key(dumps[r][0]) != furthest]
    if behind:
        lines.append(f"  ranks {behind} are behind: the others wait for them in a collective; see their stacks")
    else:
        lines.append("  every rank reached the same point: a collective that never completed (network, a dead peer)")
    return "\n".join(lines) + "\n"


def build_watchdog(config: dict[str, Any] | None, run_dir: str) -> HangWatchdog | None:
    """The watchdog of a run's ``watchdog`` config (None when it is null)."""
    if not config:
        return None
    unknown = sorted(set(config) - {"timeout_s", "exit", "grace_s"})
    if unknown:
        raise ConfigError(f"unknown watchdog keys {unknown}; known: timeout_s, exit, grace_s")
    return HangWatchdog(run_dir, **config)
