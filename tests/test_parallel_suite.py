"""`make test` runs two tests at a time (pytest-xdist): tests/conftest.py's scheduler sends whole
units (a file, or the files of one WORKER_SHARES group) to a worker, so a shared run is built once.
Driven here with stand-ins for xdist's workers and pytest's items; the real thing is every `make test`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import LONGEST_FIRST, pytest_collection_modifyitems, pytest_xdist_make_scheduler

SHARED = ["tests/test_data_resume.py::a", "tests/test_strategies.py::b", "tests/test_world_size_resume.py::c"]
SLURM = ["tests/test_slurm_cluster.py::d", "tests/test_sweep.py::e"]
OTHERS = ["tests/test_model.py::f", "tests/test_model.py::g", "tests/test_guard.py::h", "tests/test_guard.py::i"]


class Worker:
    """What the scheduler uses of xdist's WorkerController: records the test indexes sent to it."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.sent.extend(indexes)

    def shutdown(self) -> None:
        self.shutting_down = True


def test_each_unit_goes_to_one_worker_in_the_collected_order() -> None:
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True), getvalue={"tx": ["2*popen"]}.get)
    scheduler = pytest_xdist_make_scheduler(config, None)
    collection = [SHARED[1], SLURM[0], *OTHERS, SHARED[0], SLURM[1], SHARED[2]]
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    done: set[tuple[str, int]] = set()
    while not scheduler.tests_finished:  # each worker runs what it was sent, and asks for more
        for worker in workers:
            for index in [i for i in worker.sent if (worker.gateway.id, i) not in done]:
                done.add((worker.gateway.id, index))
                scheduler.mark_test_complete(worker, index)

    got = [{collection[i] for i in worker.sent} for worker in workers]
    assert set.union(*got) == set(collection)
    for unit in (SHARED, SLURM, OTHERS[:2], OTHERS[2:]):  # all of a unit on one worker
        assert sum(bool(set(unit) & tests) for tests in got) == 1, (unit, got)
    assert config.option.loadscopereorder is False  # xdist would put the units with the most tests first
    assert collection[workers[0].sent[0]] == SHARED[1]  # the first unit collected is the first sent


def item(nodeid: str, slow: bool = False, fixtures: tuple[str, ...] = ()) -> SimpleNamespace:
    mark = pytest.mark.slow.mark if slow else None
    return SimpleNamespace(nodeid=nodeid, fixturenames=list(fixtures), get_closest_marker=lambda name: mark)


def test_a_worker_collects_the_longest_units_first_then_the_files_with_most_slow_tests() -> None:
    items = [
        item("tests/test_model.py::f"), item("tests/test_pretrain.py::x", slow=True),
        item("tests/test_loggers.py::y", slow=True), item("tests/test_loggers.py::z", slow=True),
        item("tests/test_guard.py::h", slow=True), item("tests/test_strategies.py::b", True, ("strategy_runs",)),
        item("tests/test_sweep.py::e"),
    ]  # fmt: skip
    assert LONGEST_FIRST[:3] == ["shared runs", "test_guard.py", "SLURM cluster"]
    pytest_collection_modifyitems(SimpleNamespace(workerinput={}), items)
    assert [i.nodeid.split("::")[0].removeprefix("tests/") for i in items] == [
        "test_strategies.py", "test_guard.py", "test_sweep.py", "test_loggers.py", "test_loggers.py",
        "test_pretrain.py", "test_model.py",
    ]  # fmt: skip


def test_a_test_reading_a_shared_run_outside_its_unit_stops_the_collection_with_the_fix() -> None:
    items = [item("tests/test_new_feature.py::t", True, ("tiny_data_dir", "ddp_run"))]
    with pytest.raises(pytest.UsageError, match='add "test_new_feature.py": "shared runs" to WORKER_SHARES'):
        pytest_collection_modifyitems(SimpleNamespace(), items)
