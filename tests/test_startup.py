"""cgpt.startup: the known third-party noise is dropped, everything else stays; heavy imports run
without the garbage collector and leave it as they found it."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
from conftest import REPO_ROOT

PROBE = textwrap.dedent(
    """
    import logging, warnings
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cgpt.startup import quiet_third_party
    if QUIET:
        quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    log.info("GPU available: False, used: False")
    log.info("TPU available: False, using: 0 TPU cores")
    log.info("Using bfloat16 Automatic Mixed Precision (AMP)")
    log.info("`Trainer.fit` stopped: `max_steps=6` reached.")
    log.info("GPU available: True (cuda), used: True")
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    warnings.warn("data.seq_len=64 does not match the shards", UserWarning)
    warnings.warn("a FutureWarning about something else", FutureWarning)
    """
)


def _run(quiet: bool) -> str:
    code = f"QUIET = {quiet}\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def test_known_noise_is_dropped_and_everything_else_kept() -> None:
    loud, quiet = _run(False), _run(True)
    noise = ("💡 Tip", "GPU available: False", "TPU available", "Automatic Mixed Precision", "LeafSpec")
    for text in noise:
        assert text in loud, text  # the probe really emits it
        assert text not in quiet, text
    for text in ("max_steps=6", "GPU available: True", "data.seq_len=64", "something else"):
        assert text in quiet, text  # the user's own warnings and useful lines stay


def test_filters_are_added_once() -> None:
    from cgpt.startup import LIGHTNING_INFO_LOGGERS, quiet_third_party

    quiet_third_party()
    quiet_third_party()
    for name in LIGHTNING_INFO_LOGGERS:
        assert len(logging.getLogger(name).filters) == 1


class _Node:
    me: _Node


def test_heavy_imports_pause_the_collector_then_freeze_what_they_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from cgpt import startup
    from cgpt.startup import heavy_imports

    monkeypatch.setattr(startup, "_FROZEN", False)
    frozen = gc.get_freeze_count()
    try:
        with heavy_imports():
            assert not gc.isenabled()
            built = [[] for _ in range(1000)]  # what an import leaves behind: tracked, and alive
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(built)  # out of every later collection
        cycle = _Node()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None  # a cycle made afterwards is still collected
    finally:
        gc.unfreeze()


def test_heavy_imports_keep_a_collector_that_was_off_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from cgpt import startup
    from cgpt.startup import heavy_imports

    monkeypatch.setattr(startup, "_FROZEN", False)
    gc.disable()
    try:
        with heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_heavy_imports_freeze_once_so_a_multirun_job_does_not_keep_the_last_ones_garbage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cgpt import startup
    from cgpt.startup import heavy_imports

    monkeypatch.setattr(startup, "_FROZEN", False)
    try:
        with heavy_imports():  # the first job's imports
            pass
        frozen = gc.get_freeze_count()
        last_job = _Node()  # the previous job's module and trainer: garbage in a cycle
        last_job.me = last_job
        alive = weakref.ref(last_job)
        del last_job
        with heavy_imports():  # the next job of the same multirun process
            assert gc.isenabled()
        assert gc.get_freeze_count() == frozen
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_an_entry_point_prints_the_python_stack_of_a_native_abort(tmp_path) -> None:
    """A C++ library that aborts (a communication thread torn down at exit, say) leaves one line of
    its own; after prepare_entry_point the process also prints where Python was, thread by thread."""
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(f"""
        import os
        from cgpt.startup import prepare_entry_point
        prepare_entry_point(root={str(REPO_ROOT)!r})

        def tear_down_communication():
            os.abort()

        tear_down_communication()
    """)
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -6
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "in tear_down_communication" in proc.stderr


FINISH = """
import atexit, multiprocessing, os, time
from cgpt import startup

def native_teardown():  # what an exit-time destructor of a C++ library may do
    os.abort()

if __name__ == "__main__":
    atexit.register(native_teardown)
    worker = multiprocessing.Process(target=time.sleep, args=(60,), daemon=True)  # a DataLoader worker
    worker.start()
    print("worker", worker.pid)
    print("summary written", end="")  # unflushed: finish_process must flush it
    if {done}:
        startup.mark_distributed_run_done()
    startup.finish_process()
    print(" and returned", flush=True)
"""


@pytest.mark.parametrize("done", [True, False])
def test_a_finished_distributed_rank_exits_cleanly_without_the_interpreters_teardown(tmp_path, done: bool) -> None:
    """A rank whose run succeeded and whose process group is gone exits 0 with its output flushed and
    its worker processes stopped, whatever a native library would do at exit; any other process
    (here: one that never trained as a rank) goes through the normal teardown."""
    script = tmp_path / "entry.py"
    script.write_text(FINISH.format(done=done))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    if done:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.endswith("summary written")
        worker = int(proc.stdout.split()[1])
        with pytest.raises(ProcessLookupError):  # terminated and reaped, not left to outlive the job
            os.kill(worker, 0)
    else:
        assert proc.returncode == -6  # the teardown ran: the simulated native abort
        assert "summary written and returned" in proc.stdout
