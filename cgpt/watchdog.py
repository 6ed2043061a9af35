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

The limit can also follow the run's own pace: with ``median_multiple`` set, once ``warmup_steps``
optimizer steps are timed, the limit is ``max(timeout_s, median_multiple x the median step time``
of the last ``window`` steps): ``timeout_s`` is then the floor.

Stragglers: every ``straggler_every`` optimizer steps the ranks all-gather the time each spent in
its own forward passes since the last check (DDP's forward has no collective, so a slow rank's
time is its own; the backward and the step are where the others wait for it). A rank above
``straggler_ratio`` x the median of the other ranks is reported (a progress line, the logged
``watchdog/straggler_ratio``, the largest ratio, and an entry of the ``watchdog`` section of
summary.json, kept in checkpoints so a resumed run lists the earlier ones too) and training goes on.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch

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
        median_multiple: with it, the limit is ``max(timeout_s, median_multiple x median step time)``
            once ``warmup_steps`` steps are timed (None: ``timeout_s`` alone).
        warmup_steps: optimizer steps timed before the median counts (the first ones compile, warm caches).
        window: the last step times the median is taken over.
        straggler_ratio: a rank whose forward time is above this multiple of the other ranks' median is
            reported as a straggler (None: no check).
        straggler_every: optimizer steps between straggler checks (each one small all-gather).
    """

    def __init__(self, dirpath: str, timeout_s: float = 1800.0, exit: bool = True, grace_s: float = 15.0,
                 median_multiple: float | None = None, warmup_steps: int = 5, window: int = 100,
                 straggler_ratio: float | None = 2.0, straggler_every: int = 50) -> None:  # fmt: skip
        if timeout_s <= 0 or grace_s < 0:
            raise ConfigError(f"watchdog.timeout_s={timeout_s} must be positive and grace_s={grace_s} >= 0")
        if median_multiple is not None and median_multiple <= 1:
            raise ConfigError(f"watchdog.median_multiple={median_multiple} must be > 1 (or null)")
        if warmup_steps < 0 or window < 1 or straggler_every < 1:
            raise ConfigError("watchdog.warmup_steps must be >= 0, window and straggler_every >= 1")
        if straggler_ratio is not None and straggler_ratio <= 1:
            raise ConfigError(f"watchdog.straggler_ratio={straggler_ratio} must be > 1 (or null)")
        self.folder = Path(dirpath) / "hang"
        self.timeout_s = float(timeout_s)
        self.median_multiple = median_multiple
        self.warmup_steps, self.straggler_every = int(warmup_steps), int(straggler_every)
        self.straggler_ratio = straggler_ratio
        self.limit_s = self.timeout_s  # the limit in force (rises with the median step time)
        self.step_times: deque[float] = deque(maxlen=window)
        self.stragglers: list[dict[str, Any]] = []
        self._steps_timed = 0
        self._step_start: float | None = None
        self._forward_start = 0.0
        self._forward_s = 0.0  # this rank's forward time since the last straggler check
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
        self._forward_start = self._beat
        if self._step_start is None:
            self._step_start = self._beat

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(1, trainer.global_step)
        self._forward_s += self._beat - self._forward_start

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(2, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._progress(3, trainer.global_step)
        if trainer.fit_loop._should_accumulate():
            return
        self._time_step(self._beat)
        if self.straggler_ratio is not None and trainer.global_step % self.straggler_every == 0:
            self._check_stragglers(trainer, pl_module)

    # --- the pace: median step time and stragglers ---------------------------------------------
    def _time_step(self, now: float) -> None:
        """Record an optimizer step's time and move the limit (median-multiple rule)."""
        if self._step_start is not None:
            self._steps_timed += 1
            if self._steps_timed > self.warmup_steps:
                self.step_times.append(now - self._step_start)
        self._step_start = now
        if self.median_multiple is not None and self.step_times:
            self.limit_s = max(self.timeout_s, self.median_multiple * statistics.median(self.step_times))

    def _check_stragglers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """All-gather each rank's forward time since the last check; report ranks far above the median."""
        mine = torch.tensor([self._forward_s], dtype=torch.float64, device=pl_module.device)
        self._forward_s = 0.0
        times = trainer.strategy.all_gather(mine).reshape(-1).tolist() if self._world > 1 else [mine.item()]
        ratios = straggler_ratios(times)
        pl_module.log("watchdog/straggler_ratio", torch.tensor(max(ratios), dtype=torch.float64))
        slow = [r for r, ratio in enumerate(ratios) if ratio > self.straggler_ratio]
        if not slow:
            return
        step = trainer.global_step
        for r in slow:
            self.stragglers.append({"step": step, "rank": r, "ratio": round(ratios[r], 2),
                                    "forward_s": round(times[r], 3)})  # fmt: skip
        if self._rank == 0:
            ranks = ", ".join(f"rank {r} {times[r]:.2f}s ({ratios[r]:.1f}x the median of the others)" for r in slow)
            print(f"watchdog: step {step}: straggler(s): forward time over the last {self.straggler_every} steps: "
                  f"{ranks} (watchdog.straggler_ratio={self.straggler_ratio}); training goes on",
                  flush=True)  # fmt: skip

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._beat = time.monotonic()

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        self._beat = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop.set()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()

    # --- reporting and checkpoints -------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The ``watchdog`` section of summary.json: the limit in force at the end and every
        straggler reported (``step``, ``rank``, ``ratio`` to the other ranks' median, ``forward_s``)."""
        return {"enabled": True, "timeout_s": self.timeout_s, "limit_s": round(self.limit_s, 1),
                "straggler_ratio": self.straggler_ratio, "straggler_every": self.straggler_every,
                "stragglers": self.stragglers}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"stragglers": self.stragglers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stragglers = list(state.get("stragglers", []))

    # --- firing --------------------------------------------------------------------------------
    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self._beat > self.limit_s:
                self.fire()
                return

    def _limit_text(self) -> str:
        if self.limit_s > self.timeout_s and self.step_times:
            median = statistics.median(self.step_times)
            return (f"limit {self.limit_s:.1f}s = watchdog.median_multiple={self.median_multiple:g} x the median "
                    f"step time {median:.3f}s (floor watchdog.timeout_s={self.timeout_s:g})")  # fmt: skip
        return f"watchdog.timeout_s={self.timeout_s:g}"

    def fire(self) -> None:
        """Dump this rank's stacks, report (rank 0), and exit when configured to."""
        self.fired = True
        idle = time.monotonic() - self._beat
        micro, phase, step = self._where
        header = {"rank": self._rank, "pid": os.getpid(), "host": socket.gethostname(), "idle_s": round(idle, 1),
                  "completed_steps": step, "micro_batch": micro, "phase": PHASES[phase],
                  "limit_s": round(self.limit_s, 1),
                  "main_thread": f"0x{threading.main_thread().ident:016x}"}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self._rank}.txt"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(tmp, path)  # complete files only: rank 0 reads them
        msg = (f"watchdog: rank {self._rank}: no progress for {idle:.0f}s ({self._limit_text()}) "
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


def straggler_ratios(times: list[float]) -> list[float]:
    """Each rank's time over the median of the *other* ranks' (with two ranks, the median of both
    would cap the ratio below 2). One rank: 1."""
    ratios = []
    for r, t in enumerate(times):
        others = times[:r] + times[r + 1 :]
        median = statistics.median(others) if others else t
        ratios.append(t / median if median > 0 else 1.0)
    return ratios


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
    known = ("timeout_s", "exit", "grace_s", "median_multiple", "warmup_steps", "window", "straggler_ratio",
             "straggler_every")  # fmt: skip
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"unknown watchdog keys {unknown}; known: {', '.join(known)}")
    return HangWatchdog(run_dir, **config)
