"""The suite starts the ranks of a one-node multi-process run itself (tests/conftest.py's run_ranks),
with the variables torchrun gives its ranks, so it must keep torchrun's rules: each rank sees its
place in the run, a failed rank ends the others (a rank left in a collective would hang the test),
and the failure reported is the one that happened first, not the kill that followed it. Driven with
tiny Python programs; every 2-process training test runs through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ranks_per_node, run_ranks
from forkserver import ForkServers, import_time_environment

pytestmark = pytest.mark.slow  # they start processes (tiny ones: 7 tests in about 5 s)


def test_each_rank_gets_torchruns_variables_and_one_master() -> None:
    code = "import os; print(' '.join(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')))"
    proc = run_ranks(["-c", code], 3, dict(os.environ), timeout=60)
    assert proc.returncode == 0
    rows = sorted(line.split() for line in proc.stdout.splitlines())
    assert [r[:3] for r in rows] == [["0", "0", "3"], ["1", "1", "3"], ["2", "2", "3"]]
    assert len({r[3] for r in rows}) == 1  # one rendezvous port for the whole run


def test_a_failed_rank_ends_the_others_and_its_exit_code_is_reported() -> None:
    # rank 1 fails at once; rank 0 would sleep for a minute (a rank stuck in a collective)
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(60 * (r == 0)); sys.exit(3 * r)"
    start = time.monotonic()
    proc = run_ranks(["-c", code], 2, dict(os.environ), timeout=120)
    assert proc.returncode == 3  # rank 1's code, not rank 0's -9 from the kill
    assert time.monotonic() - start < 30


def test_a_run_past_its_timeout_is_killed() -> None:
    start = time.monotonic()
    with pytest.raises(Exception, match="timed out after 1"):
        run_ranks(["-c", "import time; time.sleep(60)"], 2, dict(os.environ), timeout=1)
    assert time.monotonic() - start < 30


def test_only_one_node_runs_of_several_devices_are_started_as_ranks() -> None:
    assert ranks_per_node(["train/pretrain.py", "trainer.devices=2"]) == 2
    assert ranks_per_node(["train/pretrain.py", "trainer.devices=1"]) == 1
    assert ranks_per_node(["train/pretrain.py"]) == 1
    assert ranks_per_node(["train/pretrain.py", "trainer.devices=2", "trainer.num_nodes=2"]) == 1  # srun's job
    assert ranks_per_node(["train/pretrain.py", "trainer.devices=auto"]) == 1  # Lightning decides
    assert ranks_per_node(["bench/train_throughput.py", "trainer.devices=2"]) == 1


# --- the fork servers (tests/forkserver.py) ------------------------------------------------------
# A served run must be the program a fresh interpreter would run: its argv, working folder,
# environment, descriptors, process group, seeds and exit code. The servers here preload numpy only.

PROBE = """
import json, os, sys
import numpy
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "run": os.environ.get("CGPT_PROBE"),
                  "leader": os.getpgid(0) == os.getpid(), "main": __name__, "draw": numpy.random.random()}))
print("to stderr", file=sys.stderr)
END
"""


def _probe(tmp_path: Path, end: str) -> str:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.replace("END", end))
    return str(script)


def _run(servers: ForkServers, argv: list[str], env: dict[str, str]) -> tuple[int, str, str, bool]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = servers.spawn(argv, env, out.fileno(), err.fileno())
        served = proc is not None
        if proc is None:
            proc = subprocess.Popen(
                [sys.executable, *argv], cwd=servers.cwd, env=env, stdout=out, stderr=err, process_group=0
            )
        code = proc.wait(timeout=60)
        out.seek(0), err.seek(0)
        return code, out.read().decode(), err.read().decode(), served


@pytest.fixture
def servers(tmp_path: Path):
    pool = ForkServers(tmp_path, preload=("numpy.random",))  # so that the children inherit its state
    yield pool
    pool.close()


def test_a_served_run_is_the_program_a_fresh_interpreter_runs(servers: ForkServers, tmp_path: Path) -> None:
    script = _probe(tmp_path, "sys.exit(7)")
    env = {**os.environ, "CGPT_PROBE": "first"}
    fresh = _run(servers, [script, "a", "b=1"], env)
    assert fresh[3] is False  # an environment's first run starts a fresh interpreter
    served = [_run(servers, [script, "a", "b=1"], {**env, "CGPT_PROBE": "run 0"})]  # starts the server
    served.append(_run(servers, [script, "a", "b=1"], dict(os.environ)))  # the server had CGPT_PROBE
    assert all(s[3] for s in served)  # then its server forks the others
    for code, _, err, _ in (fresh, *served):
        assert code == 7 and err == "to stderr\n"
    seen = [json.loads(out) for _, out, _, _ in (fresh, *served)]
    for s in seen:
        assert s["argv"] == [script, "a", "b=1"] and s["main"] == "__main__" and s["leader"]
        assert s["path0"] == str(tmp_path) and s["cwd"] == str(tmp_path)
    assert [s["run"] for s in seen] == ["first", "run 0", None]  # a run-time variable may differ
    assert len({s["draw"] for s in seen}) == 3  # each child seeds its own random numbers


def test_a_served_run_reports_crashes_and_kills_as_a_fresh_one_would(servers: ForkServers, tmp_path: Path) -> None:
    served = []
    for end, expected in (("raise ValueError('boom')", 1), ("os._exit(5)", 5), ("os.kill(os.getpid(), 9)", -9)):
        script = _probe(tmp_path, end)
        runs = [_run(servers, [script], dict(os.environ)) for _ in range(2)]
        served += [r[3] for r in runs]
        for code, _, err, _ in runs:
            assert code == expected, (end, code, err)
        if expected == 1:
            assert all("ValueError: boom" in err for _, _, err, _ in runs)
    assert served == [False] + [True] * 5  # one environment: the first run fresh, then its server


def test_a_variable_read_while_importing_gets_a_server_of_its_own(servers: ForkServers, tmp_path: Path) -> None:
    """RANK is read by Lightning at import: a run of rank 1 is never forked from rank 0's server."""
    script = _probe(tmp_path, "")
    for rank in ("0", "1", "0", "1"):
        _run(servers, [script], {**os.environ, "RANK": rank})
    assert len(servers._servers) == 2 and all(servers._servers.values())
    assert {dict(key)["RANK"] for key in servers._servers} == {"0", "1"}
    assert import_time_environment({"CGPT_X": "1", "MASTER_PORT": "2", "RANK": "1"}) == {("RANK", "1")}
