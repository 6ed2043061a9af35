"""Shared fixtures and helpers: a tiny prepared dataset, the repository paths, the training runs the
strategy and resume tests start and read back, and the CI rule that nothing skips silently."""

from __future__ import annotations

import atexit
import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from forkserver import ForkServers

if TYPE_CHECKING:
    import torch
    import transformers

    from cgpt.model import GPT

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the entry points set before composing: conf/paths resolves ${oc.env:CGPT_ROOT} (tests compose in-process).
os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))
# Measured peaks (cgpt.hardware.cached_peak_flops) go to a cache of this session, not the user's,
# removed when the session ends. xdist's workers inherit the folder of the process that started them.
if "CGPT_CACHE_DIR" not in os.environ:
    os.environ["CGPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="cgpt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CGPT_CACHE_DIR"], ignore_errors=True)


def load_script(path: Path) -> ModuleType:
    """An entry-point script (``slurm/submit.py``, ...) imported as a module, by path: scripts are
    not a package, and no test puts a script folder on the import path."""
    spec = importlib.util.spec_from_file_location(f"cgpt_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = REPO_ROOT / "data" / "corpus" / "shakespeare.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first few Shakespeare works, prepared at seq_len 64 into several small shards."""
    import gzip

    from cgpt.data.prepare import prepare

    src = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with gzip.open(CORPUS, "rt") as f, open(src, "w") as out:
        for _, line in zip(range(6), f):
            out.write(line)
    out_dir = tmp_path_factory.mktemp("prepared")
    prepare([str(src)], out_dir, seq_len=64, val_every=3, shard_size_mb=0.1, log=lambda m: None)
    return out_dir


def ranks_per_node(args: list[str]) -> int:
    """How many processes a one-node run of the repository script ``args`` starts itself: its
    ``trainer.devices`` when that is above 1 on one node, else 1 (one process, or a multi-node layout
    that a launcher or SLURM starts)."""
    devices = [a.split("=", 1)[1] for a in args if a.startswith("trainer.devices=")]
    nodes = [a.split("=", 1)[1] for a in args if a.startswith("trainer.num_nodes=")]
    if args[0].startswith("train/") and devices and devices[-1].isdigit() and nodes in ([], ["1"]):
        return max(int(devices[-1]), 1)
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elastic_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun's agent gives rank ``rank`` of a one-node run of ``world`` processes
    (torch.distributed.elastic's local agent); Lightning reads them as a torchelastic launch."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank), "GROUP_RANK": "0",
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
        "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "cgpt-test", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False",
    }  # fmt: skip


# What every run the tests start gets on top of the worker's environment.
RUN_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
# Runs forked from pre-imported servers (tests/forkserver.py). CGPT_TEST_FORKSERVER=0: every run
# starts as a fresh process (to compare, or to rule the servers out).
FORK_SERVERS = ForkServers(
    REPO_ROOT, enabled=os.environ.get("CGPT_TEST_FORKSERVER", "1") != "0", folder=Path(os.environ["CGPT_CACHE_DIR"])
)  # their sockets go with the session's folder
atexit.register(FORK_SERVERS.close)


def run_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **RUN_ENV, **(env or {})}


def start(
    args: list[str], env: dict[str, str], stdout: int, stderr: int, process_group: int = 0, fresh: bool = False
) -> Any:
    """Start ``python *args`` in the repository root, in process group ``process_group`` (0: a group of
    its own), with the given descriptors for stdout and stderr. A repository script is forked from a
    server that has imported what it needs when one serves its environment (tests/forkserver.py),
    instead of starting a new interpreter. Returns a ``subprocess.Popen`` or what it stands for
    (``pid``, ``poll``, ``wait``). ``fresh``: always a new interpreter."""
    if not fresh and (served := FORK_SERVERS.spawn(args, env, stdout, stderr, process_group)):
        return served
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr, process_group=process_group
    )


def start_ranks(
    args: list[str], world: int, env: dict[str, str], stdout: int, stderr: int, fresh: bool = False
) -> list[Any]:
    """Start ``world`` processes of ``python *args`` at once (:func:`start`), each with the variables
    torchrun gives its ranks (``world`` 1: one plain process), in one process group, killed as one."""
    port, procs = free_port(), []
    for rank in range(world):
        rank_env = {**env, **elastic_env(rank, world, port)} if world > 1 else env
        procs.append(start(args, rank_env, stdout, stderr, procs[0].pid if procs else 0, fresh))
    return procs


def run_ranks(
    args: list[str], world: int, env: dict[str, str], timeout: float, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run ``python *args`` as ``world`` processes started at once, each with the variables torchrun
    gives its ranks (as srun does on a cluster; ``world`` 1: one plain process), and wait for them.
    When one fails, the others are killed (torchrun's rule), so a rank blocked in a collective does
    not hang the test; the exit code is that of the first rank that failed by itself. Their output is
    interleaved into one stdout and one stderr, as torchrun's is.

    What torchrun adds, an agent process, costs a whole ``import torch`` before the first rank starts
    (1.6 s of CPU and 2 s of wall time for a 2-process smoke run on 2 idle cores, 13.3 s against
    11.6 s of CPU), and the suite starts about 45 such runs. The shared FSDP run and the README's
    commands still go through torchrun (``launcher`` of :func:`run_script`), the SLURM jobs srun."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        procs = start_ranks(args, world, env, out.fileno(), err.fileno(), fresh)
        deadline = time.monotonic() + timeout
        failed = 0
        try:
            while (codes := [p.poll() for p in procs]).count(0) < world:
                if failed := next((c for c in codes if c not in (None, 0)), 0):
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(args, timeout)
                time.sleep(0.05)
        finally:
            if any(p.poll() is None for p in procs):
                os.killpg(procs[0].pid, signal.SIGKILL)
            for p in procs:
                p.wait(timeout=30)
        out.seek(0), err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
        return subprocess.CompletedProcess(args, failed, stdout, stderr)


def run_script(
    args: list[str], timeout: float = 300, env: dict[str, str] | None = None, launcher: str = "ranks",
    fresh: bool = False,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a repository script in a subprocess and fail with its output on a non-zero exit. A training
    run on several devices of one node starts all its ranks at once, as srun and torchrun do:
    ``launcher="ranks"`` starts them itself (:func:`run_ranks`), ``"torchrun"`` under torchrun's agent.
    ``launcher="lightning"`` runs one process, and Lightning starts rank 1 only when rank 0 reaches
    ``Trainer.fit``, a whole start-up later. The launchers are documented in
    docs/scaling-out.md#launching-the-ranks. ``fresh``: new interpreters, never forked from a server
    (:func:`start`), for a test of what a run prints from its first line."""
    full_env = run_env(env)
    world = ranks_per_node(args)
    if world > 1 and launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args]
        proc = subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    else:
        proc = run_ranks(args, 1 if launcher == "lightning" else world, full_env, timeout, fresh)
    if proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


# --- CI: a skip is a failure ----------------------------------------------------------------------
# CI installs every extra and starts a SLURM cluster, so a skip there means a broken environment or
# a test that quietly stopped running. Only tests that need hardware CI does not have may skip; they
# say so with a reason that starts with one of these.
CI_MAY_SKIP = ("needs CUDA", "needs a CUDA", "needs a GPU", "needs bf16")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not reason.removeprefix("Skipped: ").startswith(CI_MAY_SKIP):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (CI runs everything; only {CI_MAY_SKIP} may skip): {reason}"


# --- two tests at a time: `pytest -n 2` (pytest-xdist) --------------------------------------------
# Each xdist worker builds its own session and module fixtures. Tests go to the workers one file at a
# time, so a module fixture (a training run its file's tests read back) is built once; the files in
# WORKER_SHARES go as one unit: the session's shared runs are built once, and the SLURM cluster's
# time-limit jobs never queue behind the other worker's jobs.
WORKER_SHARES = {
    "test_strategies.py": "shared runs", "test_world_size_resume.py": "shared runs",
    "test_data_resume.py": "shared runs", "test_slurm_cluster.py": "SLURM cluster", "test_sweep.py": "SLURM cluster",
}  # fmt: skip
SHARED_RUNS = {"ddp_run", "strategy_runs", "ddp_run_resumed_on_one_rank"}  # the session fixtures below
# The longest units (serial seconds on 2 cores: 360, 317, 113, 82) start first, then the units with
# the most slow tests, so that the fast files fill the end.
LONGEST_FIRST = ["shared runs", "test_guard.py", "SLURM cluster", "test_rollback_deepspeed.py"]


def _worker_unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return WORKER_SHARES.get(Path(path).name, path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a plain pytest run may lack
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole units (files, or WORKER_SHARES' groups of files) to the workers, in the order the
    workers collected them (see :func:`pytest_collection_modifyitems`)."""
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _worker_unit(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads a shared run must be in the "shared runs" unit (or, under xdist, each worker
    would build the runs again). In an xdist worker: LONGEST_FIRST, then the units with the most slow tests."""
    for item in items:
        if SHARED_RUNS & set(getattr(item, "fixturenames", ())) and _worker_unit(item.nodeid) != "shared runs":
            raise pytest.UsageError(
                f"{item.nodeid} reads a shared run ({', '.join(sorted(SHARED_RUNS))}): add "
                f'"{Path(item.nodeid.split("::")[0]).name}": "shared runs" to WORKER_SHARES in tests/conftest.py'
            )
    if not hasattr(config, "workerinput"):
        return
    slow: dict[str, int] = {}
    for item in items:
        unit = _worker_unit(item.nodeid)
        slow[unit] = slow.get(unit, 0) + (item.get_closest_marker("slow") is not None)
    first = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    rank = {unit: (first.get(Path(unit).name, len(first)), -n, i) for i, (unit, n) in enumerate(slow.items())}
    items.sort(key=lambda item: rank[_worker_unit(item.nodeid)])


# --- training runs: start, kill, read back --------------------------------------------------------
STEPS = 6  # optimizer steps of every pretrain_args run; checkpoints every 2, validation every 4


def pretrain_args(data_dir: Path, out: Path, strategy: str, devices: int = 2, *extra: str) -> list[str]:
    """train/pretrain.py on the tiny model for STEPS steps, fp32, CSV log, checkpoints every 2 steps."""
    return [
        "train/pretrain.py", "experiment=smoke", f"data.dir={data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", f"trainer.devices={devices}", f"strategy={strategy}",
        f"trainer.max_steps={STEPS}", "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.keep_last=2",
        "trainer.validate_every_steps=4", "sample=null", "logger=csv", *extra,
    ]  # fmt: skip


# The end-of-run text sample, for the runs that check it (pretrain_args turns it off).
SAMPLE_ON = "sample={prompt: 'ROMEO:', max_new_tokens: 8, temperature: 0.8, top_k: 50}"


@pytest.fixture(scope="session")
def single_process_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted single-process run (pretrain_args, strategy auto, with the sample): the
    reference of the resume tests and the run the output checks read (a fresh interpreter, so they
    see what importing prints too: see :func:`start`). Shared, so read-only: copy it
    before running anything in it. Returns (output folder, the finished process)."""
    out = tmp_path_factory.mktemp("single_process") / "run"
    return out, run_script(pretrain_args(tiny_data_dir, out, "auto", 1, SAMPLE_ON), timeout=300, fresh=True)


# Every shared 2-process run also dumps its full training state (StateDump) once step WORLD_SIZE_STEP
# is done: tests/test_world_size_resume.py resumes its step-WORLD_SIZE_STEP checkpoint at another
# world size and compares the loaded state with that dump, so the shared run is its first leg.
WORLD_SIZE_STEP = 4


def state_dump(dirpath: Path, *at_steps: int) -> str:
    """The override that adds the test-only :class:`cgpt.strategies.full_state.StateDump` to a run:
    full weights and Adam state at its start, its end and after each step of ``at_steps``."""
    steps = f", at_steps: [{', '.join(map(str, at_steps))}]" if at_steps else ""
    return f"+callbacks.dump={{_target_: cgpt.strategies.full_state.StateDump, dirpath: {dirpath}{steps}}}"


@pytest.fixture(scope="session")
def ddp_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-process DDP run (pretrain_args: micro-batch 4 of a global batch of 8, no
    accumulation) with its data trace in ``<out>/trace.rank*`` (CGPT_DATA_TRACE) and its state dumps
    in ``<out>/dump`` (``step4.pt``: see WORLD_SIZE_STEP): the strategy tests' reference and the
    world-size and data resume tests'. Started the way a workstation user starts it (Lightning's
    launcher; see ``strategy_runs`` for the others), so the strategy parity tests also show that the
    launchers train alike. Shared, so read-only. Returns its output folder."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = pretrain_args(tiny_data_dir, out, "ddp", 2, state_dump(out / "dump", WORLD_SIZE_STEP))
    run_script(args, timeout=400, env={"CGPT_DATA_TRACE": str(out / "trace")}, launcher="lightning")
    return out


def copy_resume_point(run: Path, out: Path) -> Path:
    """Copy a shared run's step-WORLD_SIZE_STEP checkpoint, under its own name, into ``out``'s empty
    checkpoint folder: the same command started there resumes it (no ``last.ckpt``: the newest
    complete step checkpoint), without writing into the shared run (DeepSpeed converts a checkpoint
    for another world size next to it), and a resume that saved its step again would collide with it
    (``-v1``). Not as ``last.ckpt``: the checkpoint's callback state names the shared run's folder,
    so Lightning would save the resumed run's own as ``last-v1.ckpt`` beside the copy."""
    src = run / "checkpoints" / f"step{WORLD_SIZE_STEP:07d}.ckpt"
    dst = out / "checkpoints" / src.name
    dst.parent.mkdir(parents=True)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


@pytest.fixture(scope="session")
def ddp_run_resumed_on_one_rank(
    ddp_run: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """``ddp_run``'s step-4 checkpoint resumed by 1 process (2 accumulation steps) with 2 DataLoader
    workers (the 2-process run had none) to STEPS, in a folder of its own: see
    :func:`copy_resume_point`. Its data trace is in ``<out>/trace.rank0``, its state dumps
    (``start.pt`` right after the load, ``end.pt``) in ``<out>/dump``. Read by the world-size resume
    test of DDP checkpoints and the data resume test. Shared, so read-only. Returns (output folder,
    its stdout)."""
    out = tmp_path_factory.mktemp("ddp_on_one_rank") / "run"
    copy_resume_point(ddp_run, out)
    args = pretrain_args(tiny_data_dir, out, "ddp", 1, "data.num_workers=2", state_dump(out / "dump"))
    proc = run_script(args, timeout=400, env={"CGPT_DATA_TRACE": str(out / "trace")})
    return out, proc.stdout


# The strategies of the shared runs (DeepSpeed is a dev extra: CI has it, never skipped).
DEEPSPEED = ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_2_offload",
             "deepspeed_stage_3_offload"]  # fmt: skip
STRATEGIES = ["ddp", "fsdp", *DEEPSPEED]
# Activation checkpointing rides along where it is riskiest (sharded parameters): it must not change a loss.
AC = ["strategy.activation_checkpointing=true"]
STRATEGY_EXTRA = {"fsdp": AC, "deepspeed_stage_3": AC}


@pytest.fixture(scope="session")
def strategy_runs(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory, ddp_run: Path) -> dict[str, Path]:
    """One uninterrupted 2-process run per strategy (pretrain_args: 6 steps, checkpoints every 2, the
    state dumped at step 4 in ``<out>/dump``); DDP's is ``ddp_run``. Read by the strategy parity,
    checkpoint and resume tests and, as first legs, by the world-size resume tests. Shared, so
    read-only: copy a checkpoint before resuming it (a DeepSpeed resume at another world size writes
    its conversion next to the checkpoint). FSDP's runs under torchrun, the others' ranks are started
    by :func:`run_ranks` and ``ddp_run`` by Lightning: the parity tests cover the three launchers."""
    root = tmp_path_factory.mktemp("strategies")
    out = {"ddp": ddp_run}
    for name in STRATEGIES[1:]:
        out[name] = root / name
        dump = state_dump(out[name] / "dump", WORLD_SIZE_STEP)
        launcher = "torchrun" if name == "fsdp" else "ranks"
        train(tiny_data_dir, out[name], name, 2, *STRATEGY_EXTRA.get(name, []), dump, launcher=launcher)
    return out


def train(
    data_dir: Path, out: Path, strategy: str, devices: int = 2, *extra: str, timeout: float = 400,
    launcher: str = "ranks",
) -> subprocess.CompletedProcess:  # fmt: skip
    return run_script(pretrain_args(data_dir, out, strategy, devices, *extra), timeout=timeout, launcher=launcher)


def _csv_losses(version: Path) -> dict[int, float]:
    result: dict[int, float] = {}
    with open(version / "metrics.csv") as f:
        for row in csv.DictReader(f):
            try:  # the last row of a killed run may be cut short
                if row.get("train/loss"):
                    result[int(row["step"])] = float(row["train/loss"])
            except (TypeError, ValueError):
                continue
    return result


def _csv_versions(out: Path) -> list[Path]:
    return sorted((out / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def losses(out: Path) -> dict[int, float]:
    """Per-step train loss of rank 0 (step = optimizer steps done before it), over all runs in ``out``."""
    result: dict[int, float] = {}
    for version in _csv_versions(out):
        result.update(_csv_losses(version))
    return result


def trace_lines(path: Path) -> list[tuple[int, list[int]]]:
    """One CGPT_DATA_TRACE file (one rank): ``(global batch, sample keys)`` per micro-batch, in order."""
    rows = []
    for line in path.read_text().splitlines():
        global_batch, _, _, keys = line.split()
        rows.append((int(global_batch), [int(k) for k in keys.split(",")]))
    return rows


def ledger(rows: list[tuple[int, list[int]]]) -> dict[int, list[int]]:
    """The sorted sample keys of each global batch (the union over ranks and micro-batches)."""
    out: dict[int, list[int]] = {}
    for global_batch, keys in rows:
        out.setdefault(global_batch, []).extend(keys)
    return {g: sorted(k) for g, k in sorted(out.items())}


def trace_ledger(trace: Path) -> dict[int, list[int]]:
    """The ledger of a run's trace files ``<trace>.rank*`` (CGPT_DATA_TRACE=<trace>)."""
    return ledger([row for part in trace.parent.glob(trace.name + ".rank*") for row in trace_lines(part)])


def grad_norms(out: Path) -> dict[int, float]:
    """Per step: the logged pre-clip norm of the (all-reduced) gradient of the global batch, over all
    CSV logs in ``out`` (a later run's value of a step wins)."""
    result: dict[int, float] = {}
    for version in _csv_versions(out):
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                try:  # the last row of a killed run may be cut short
                    if row.get("grad_norm"):
                        result[int(row["step"])] = float(row["grad_norm"])
                except (TypeError, ValueError):
                    continue
    return result


def assert_resumed_at(out: Path, step: int) -> dict[int, float]:
    """The newest run in ``out`` continued from optimizer step ``step``: its own log (a re-run writes a
    new CSV version) starts there and runs to STEPS, and summary.json counts only the steps it ran. A
    re-run that started again at step 0 fails here even when every loss it logs is right. Returns its
    losses."""
    own = _csv_losses(_csv_versions(out)[-1])
    assert sorted(own) == list(range(step, STEPS)), f"the re-run logged steps {sorted(own)}, not {step}..{STEPS - 1}"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (STEPS, STEPS - step), summary
    return own


def kill_when(
    args: list[str], ready: Callable[[], bool], timeout: float = 400, poll: float = 0.05, may_end: bool = False
) -> bool:
    """Start a run (its ranks at once, as :func:`run_ranks` does) and SIGKILL its whole process group
    as soon as ``ready()`` is true. Returns False when the run ended first (an error unless
    ``may_end``)."""
    with open(os.devnull, "wb") as null:
        procs = start_ranks(args, ranks_per_node(args), run_env(), null.fileno(), null.fileno())
    deadline = time.time() + timeout
    try:
        while not ready():
            ended = [code for p in procs if (code := p.poll()) is not None]
            if ended and may_end:
                return False
            assert not ended, f"the run ended (rc {ended}) before it could be killed"
            assert time.time() < deadline, f"not ready to kill within {timeout}s"
            time.sleep(poll)
    finally:
        if any(p.poll() is None for p in procs):
            os.killpg(procs[0].pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
    return True


def kill_after(args: list[str], marker: Path, timeout: float = 400) -> None:
    """Start a run and SIGKILL its whole process group as soon as ``marker`` exists."""
    kill_when(args, marker.exists, timeout)


def kill_while_saving_last(args: list[str], ckpts: Path, step: int, timeout: float = 400) -> list[Path]:
    """Kill a run while it writes ``last.ckpt`` for optimizer step ``step`` (its step checkpoint is
    already written; the temporary file or folder the atomic save fills is there). Returns the
    temporaries the kill left behind: evidence that the save was cut short. On a loaded machine the
    poll can miss a short save; the run is then started again from scratch (three tries)."""

    def writing() -> bool:  # step's checkpoint is the newest, and last.ckpt's temporary is there
        newest = max((p.name for p in ckpts.glob("step*.ckpt")), default=None)
        return newest == f"step{step:07d}.ckpt" and bool(list(ckpts.glob(".last.ckpt.tmp*")))

    for _ in range(3):
        if kill_when(args, writing, timeout, poll=0.002, may_end=True):
            leftovers = list(ckpts.glob(".last.ckpt.tmp*"))
            if leftovers:
                return leftovers
        shutil.rmtree(ckpts.parent)  # the save finished before the kill landed: try again
    return []


def consolidate(*args: str) -> Path:
    """train/consolidate.py's main in this process (its imports are already paid for)."""
    from cgpt.cli.consolidate import main

    return main(list(args))


def weights(path: Path) -> dict[str, torch.Tensor]:
    from cgpt.weights import load_gpt

    return load_gpt(path).state_dict()


# --- evaluation: an independent reference ---------------------------------------------------------
EVAL_CFG = dict(n_layer=2, d_model=64, n_head=4, d_ffn=256, block_size=64)  # the evaluation tests' model


def to_hf(model: GPT) -> transformers.GPT2LMHeadModel:
    """An independent copy into transformers' GPT2LMHeadModel (Conv1D weights are (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.d_model,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.d_ffn,
            activation_function="gelu",
            layer_norm_epsilon=c.layer_norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )  # fmt: skip
    ).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        transpose = k.endswith(".weight") and any(s in k for s in ("c_attn", "c_proj", "c_fc"))
        state[k] = v.t().contiguous() if transpose else v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k or k == "lm_head.weight" for k in missing)
    hf.tie_weights()
    return hf


def reference_loglikelihood(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One request at a time, no padding, no batching: the plainest possible computation."""
    import torch
    import torch.nn.functional as F

    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(hf(full[:, :-1]).logits[0].double(), -1)
    rows = logp[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return rows[torch.arange(len(cont)), target].sum().item(), bool((rows.argmax(-1) == target).all())
