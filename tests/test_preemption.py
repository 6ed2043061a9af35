"""Preemption outside SLURM, one process: SIGUSR2 (submitit's) and SIGTERM sent to a training run at a
known step save last.ckpt at the next step boundary and exit with status 3 (docs/slurm-and-sweeps.md);
re-running the command resumes from that step, its first logged step is that step, and it ends with
the losses of an uninterrupted run.

SLURM's USR1 before a time limit: tests/test_slurm_cluster.py, on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STEPS, assert_resumed_at, losses, pretrain_args, run_script

from cgpt.preemption import EXIT_PREEMPTED


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGUSR2", "SIGTERM"])
def test_signal_saves_at_the_step_boundary_exits_3_and_the_rerun_resumes_there(
    name: str, tiny_data_dir: Path, tmp_path: Path, single_process_run
) -> None:
    out = tmp_path / "run"
    # The conftest run (6 steps, checkpoints every 2), with a progress line every step to signal on.
    args = [*pretrain_args(tiny_data_dir, out, "auto", 1), "callbacks.progress.every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step 1/{STEPS}"):  # optimizer step 1 is done
                proc.send_signal(getattr(signal, name))
                break
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    log = "".join(lines)
    assert code == EXIT_PREEMPTED, log[-4000:]
    assert f"received {name}" in log, log[-3000:]
    saved = int(re.search(r"preempted: saved \S+ at step (\d+)", log).group(1))
    # Saved at a step boundary after the signal, before the run's end, as a resumable checkpoint.
    assert 1 <= saved < STEPS, log[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "summary.json").exists()
    assert sorted(losses(out)) == list(range(saved)), "the preempted run logged past its checkpoint"

    run_script(args, timeout=240)
    own = assert_resumed_at(out, saved)  # the re-run's own log starts at the saved step
    ref = losses(single_process_run[0])
    for step, loss in own.items():  # and continues the same training (one process resumes bitwise)
        assert loss == ref[step], (step, loss, ref[step])
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single_process_run[0], out))
    assert (b["train_loss"], b["val_loss"]) == (a["train_loss"], a["val_loss"])  # measured: identical
