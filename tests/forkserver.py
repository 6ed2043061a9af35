"""A fork server for the suite's training runs: one process per test worker imports torch, Lightning,
Hydra and cgpt once, then forks a child for each run a test starts. The child sets up what a fresh
``python SCRIPT ARGS`` would have (its own process group, working folder, environment, stdin/stdout/
stderr, argv, seeds) and runs the script as ``__main__``; from there on it is that program, down to
its exit code and its interpreter teardown.

Why: a tiny test run is mostly start-up (about 5 of its 8 CPU seconds are the imports, see
docs/design/startup-time.md), and the suite starts a few hundred. A fork costs milliseconds.

What a fork cannot give a run is an environment that is read while the modules are imported: thread
pools, CPU-feature and allocator variables (OMP_NUM_THREADS, ONEDNN_*, MALLOC_*...), and the rank
(Lightning's ``rank_zero_only`` reads RANK and LOCAL_RANK at import). So each server is started with
one environment, and serves only runs whose environment differs from it in variables read at run
time (:data:`RUN_TIME_VARIABLES`, checked against what the imports read): a pool keeps a server per
environment (one for single-process runs, one per rank of the 2-process runs), started the second
time that environment is asked for; any other run starts as a fresh process, as does everything a
run starts itself (DataLoader workers, Lightning's second rank). The start-up itself is tested where
it matters: tests/test_startup.py, the README's commands (tests/test_docs.py), the shared runs under
torchrun and Lightning's launcher, and the SLURM jobs.

Run as a script, this file is the server: ``python tests/forkserver.py SOCKET [MODULE...]``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

# Variables a run may set differently from its server: none of them is read while PRELOAD is imported
# (os.environ's reads recorded during that import), only at run time.
# DS_ and PL_ (DS_ACCELERATOR, PL_GLOBAL_SEED) end up in the test worker's own environment when an
# in-process test builds a DeepSpeed strategy or seeds; DeepSpeed reads DS_ when a run imports it,
# Lightning PL_ when a run seeds.
RUN_TIME_VARIABLES = ("CGPT_", "WANDB_", "DS_", "PL_", "MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST")
# What the server imports before it forks: what every training entry point imports.
PRELOAD = ("cgpt.training", "cgpt.sft", "hydra", "omegaconf")


def import_time_environment(env: dict[str, str]) -> frozenset[tuple[str, str]]:
    """What of ``env`` a server must have been started with to serve a run with ``env``."""
    return frozenset((k, v) for k, v in env.items() if not k.startswith(RUN_TIME_VARIABLES))


# --- the server ----------------------------------------------------------------------------------


def _preload(modules: list[str]) -> None:
    import gc
    import importlib

    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # what a run's cgpt.startup.heavy_imports would freeze; keeps the children's pages shared


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("request cut short")
        data += more
    return json.loads(data), fds


def serve(path: str) -> tuple[dict, list[int]]:
    """Accept requests on the Unix socket ``path`` and fork a child for each; tell each client its
    child's pid, then its exit code. Returns only in a child, with its request and descriptors."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # the test worker that started the server is gone: stop
        if select.select([listener], [], [], 0.05)[0]:
            conn, _ = listener.accept()
            request, fds = _read_request(conn)
            sys.stdout.flush(), sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            try:  # the child does the same; whichever runs first makes the group exist before the reply
                os.setpgid(pid, request["pgid"] or pid)
            except OSError:
                pass  # the child got there first, or already ended
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass  # the client stopped waiting
            conn.close()
    sys.exit(0)


def become(request: dict, fds: list[int]) -> str:
    """In the forked child: take on what ``python SCRIPT ARGS`` started by the client would have.
    Returns the script's path."""
    import signal

    import numpy as np

    try:
        os.setpgid(0, request["pgid"])
    except PermissionError:
        pass  # the server has already placed the child (a process cannot change its group after exec; ours can)
    stdin = os.open(os.devnull, os.O_RDONLY)
    for target, fd in zip((0, 1, 2), (stdin, *fds), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # sys.stdout and sys.stderr now write to the run's descriptors, buffered as the server's were: the
    # server was started with the run's PYTHONUNBUFFERED (not a run-time variable)
    np.random.seed()  # a fresh interpreter seeds it from the OS; a fork shares the server's (random reseeds)
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    return script


# --- the client ----------------------------------------------------------------------------------


class ServedProcess:
    """A run forked by the server: what the tests use of ``subprocess.Popen``."""

    def __init__(self, conn: socket.socket, args: list[str]) -> None:
        self.args = args
        self._conn = conn
        self._buffer = b""
        self.pid = int(self._line(timeout=60))
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([self._conn], [], [], left)[0]:
                return None
            more = self._conn.recv(64)
            if not more:
                raise RuntimeError("the fork server went away")
            self._buffer += more
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None and (line := self._line(timeout=0)) is not None:
            self.returncode = int(line)
            self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self._conn.close()
        return self.returncode


class ForkServer:
    """The client side of one server, started (with ``env``, in ``cwd``) on first use."""

    def __init__(
        self, cwd: Path, env: dict[str, str], preload: tuple[str, ...] = PRELOAD, folder: Path | None = None
    ) -> None:
        self.cwd, self.env, self.preload = cwd, env, preload
        self.folder = folder or Path(os.environ.get("TMPDIR", "/tmp"))  # for its socket and log
        self._path: str | None = None
        self._server: subprocess.Popen | None = None

    def _start(self) -> str:
        if self._path is None:
            self._path = str(self.folder / f"cgpt-forkserver-{os.getpid()}-{id(self):x}.sock")
            Path(self._path).unlink(missing_ok=True)
            with open(self._path + ".log", "wb") as log:  # the server's own errors, if any
                command = [sys.executable, __file__, self._path, *self.preload]
                self._server = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=log)
            while (line := self._server.stdout.readline()) != b"ready\n":  # what importing printed, then ready
                if not line:
                    log = Path(self._path + ".log").read_text()[-3000:]
                    raise RuntimeError(f"the fork server did not start (exit {self._server.wait()}):\n{log}")
        return self._path

    def spawn(
        self, argv: list[str], env: dict[str, str], stdout: int, stderr: int, process_group: int = 0
    ) -> ServedProcess:
        """Run ``python argv...`` as a child of the server: ``process_group`` 0 makes it the leader of
        its own group (``start_new_session``'s group, without the new session)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._start())
        request = {"argv": argv, "env": env, "cwd": str(self.cwd), "pgid": process_group}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [stdout, stderr])
        return ServedProcess(conn, argv)

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            Path(self._path).unlink(missing_ok=True)
            Path(self._path + ".log").unlink(missing_ok=True)


class ForkServers:
    """One server per import-time environment, each started the second time that environment is asked
    for (a server costs what it saves once); the first time, and when off, :meth:`spawn` returns None."""

    def __init__(
        self, cwd: Path, enabled: bool = True, preload: tuple[str, ...] = PRELOAD, folder: Path | None = None
    ) -> None:
        self.cwd, self.enabled, self.preload, self.folder = cwd, enabled, preload, folder
        self._servers: dict[frozenset[tuple[str, str]], ForkServer | None] = {}

    def spawn(
        self, argv: list[str], env: dict[str, str], stdout: int, stderr: int, process_group: int = 0
    ) -> ServedProcess | None:
        if not self.enabled or not argv[0].endswith(".py"):
            return None
        key = import_time_environment(env)
        if key not in self._servers:
            self._servers[key] = None  # seen once
            return None
        if self._servers[key] is None:
            self._servers[key] = ForkServer(self.cwd, env, self.preload, self.folder)
        return self._servers[key].spawn(argv, env, stdout, stderr, process_group)

    def close(self) -> None:
        for server in self._servers.values():
            if server is not None:
                server.close()


if __name__ == "__main__":
    _preload(sys.argv[2:])
    _request, _fds = serve(sys.argv[1])
    _script = become(_request, _fds)
    del _request, _fds
    import runpy

    runpy.run_path(_script, run_name="__main__")
