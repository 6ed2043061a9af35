"""The step guard and the hang watchdog, by fault injection (cgpt.fault_injection, 2 gloo processes).

Unit tests of the rule come first (in-process, one rank). The multi-process runs inject a NaN loss
on rank 1 only, or a sleep, through a test-only callback that no config in conf/ names. A run costs
seconds of process start-up, so one run carries several faults at different steps and module
fixtures share it between the tests that read it (each test checks its own part).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_ON, pretrain_args, run_env, run_ranks, run_script, weights

from cgpt.config import ConfigError
from cgpt.guard import EXIT_GUARD_STOPPED, GuardConfig, StepGuard
from cgpt.watchdog import EXIT_HUNG, HangWatchdog, straggler_ratios

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS, BAD = 6, 3
SPIKE, TRANSIENT = 5, 5  # a later fault of the same run: a finite spike, a NaN that does not reproduce
INJECT = "cgpt.fault_injection.FaultInjector"


# --- unit: the rule ------------------------------------------------------------------------------
def feed(guard: StepGuard, loss: float, norm: float | None = 1.0) -> bool:
    guard.on_before_backward(None, None, torch.tensor(loss))
    return guard.decide(None if norm is None else torch.tensor(norm))


def test_non_finite_loss_or_norm_is_a_bad_step() -> None:
    guard = StepGuard(GuardConfig(min_history=2, window=4), "unused")
    assert not feed(guard, 2.0)
    assert feed(guard, math.nan)
    assert feed(guard, 2.0, math.inf)
    assert not feed(guard, 2.0, None)  # no norm known: only the loss is checked
    assert [e["kind"] for e in guard.events] == ["non_finite", "non_finite"]
    assert guard.events[0]["ranks"] == [0] and guard.events[0]["detail"] == "non-finite loss on rank 0"
    assert guard.events[1]["ranks"] == [] and guard.events[1]["detail"] == "non-finite global gradient norm"
    assert list(guard.losses) == [2.0, 2.0]  # bad steps stay out of the statistics


def test_loss_spike_rule_needs_history_and_catches_a_multiplied_loss() -> None:
    guard = StepGuard(GuardConfig(min_history=5, window=10, loss_spike_z=8.0), "unused")
    assert not feed(guard, 50.0)  # no history yet: not judged
    for loss in (3.0, 3.1, 2.9, 3.05, 2.95):
        assert not feed(guard, loss)
    guard.losses.popleft()  # forget the 50
    assert not feed(guard, 3.2)  # noise
    assert feed(guard, 3.0 * 10)  # a spike
    assert guard.events[-1]["kind"] == "loss_spike"
    assert guard.max_loss_z is not None and guard.max_loss_z < 8.0


def test_grad_norm_ratio_rule_is_off_by_default_and_works_when_set() -> None:
    off = StepGuard(GuardConfig(min_history=3, window=5), "unused")
    on = StepGuard(GuardConfig(min_history=3, window=5, grad_norm_ratio=10.0), "unused")
    for guard in (off, on):
        for _ in range(3):
            feed(guard, 3.0, 1.0)
    assert not feed(off, 3.0, 50.0)
    assert feed(on, 3.0, 50.0) and on.events[-1]["kind"] == "grad_norm_spike"


def test_caps_turn_skip_into_stop_and_state_round_trips() -> None:
    guard = StepGuard(GuardConfig(min_history=2, window=4, max_consecutive_skips=2), "unused")
    feed(guard, 1.0)
    assert feed(guard, math.nan) and guard.stop_reason is None
    assert feed(guard, math.nan) and "2 bad steps in a row" in guard.stop_reason
    assert guard.events[-1]["action"] == "stop"
    again = StepGuard(GuardConfig(min_history=2, window=4), "unused")
    again.load_state_dict(guard.state_dict())
    assert again.events == guard.events and list(again.losses) == [1.0] and again.skipped == 2
    stop = StepGuard(GuardConfig(action="stop"), "unused")
    assert feed(stop, math.nan) and "guard.action=stop" in stop.stop_reason


def test_the_guard_stands_aside_under_fp16_loss_scaling() -> None:
    from types import SimpleNamespace

    guard = StepGuard(GuardConfig(), "unused")
    module = SimpleNamespace(step_gate=None)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    guard.setup(trainer, module, "fit")
    assert module.step_gate is None and "fp16" in guard.summary()["inactive"]
    guard = StepGuard(GuardConfig(), "unused")
    guard.setup(SimpleNamespace(precision_plugin=SimpleNamespace()), module, "fit")
    assert module.step_gate == guard.decide and guard.summary()["inactive"] is None


class FakeModule:
    """What the guard's rollback calls on the module: each recompute returns the next scripted loss;
    a sample whose key is in ``poisoned`` has a NaN loss unless it is excluded."""

    def __init__(self, losses: list[float], keys: list[int], poisoned: set[int]) -> None:
        self.losses, self.keys, self.poisoned = list(losses), keys, poisoned
        self.excluded: list[int] = []
        self.recomputes = 0

    def recompute_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.recomputes += 1
        return torch.tensor(self.losses.pop(0)), torch.tensor(1.0)

    def sample_losses(self) -> list[tuple[int, float]]:
        return [(k, math.nan if k in self.poisoned and k not in self.excluded else 2.0) for k in self.keys]

    def step_keys(self) -> list[int]:
        return list(self.keys)

    def set_excluded_keys(self, keys: list[int]) -> None:
        self.excluded = list(keys)


def rollback_guard(module: FakeModule, **config: object) -> StepGuard:
    guard = StepGuard(GuardConfig(action="rollback", min_history=2, window=4, **config), "unused")
    guard._module = module
    return guard


def test_rollback_replays_and_quarantines_only_a_fault_that_reproduces() -> None:
    transient = FakeModule([2.0], [10, 11], poisoned=set())
    guard = rollback_guard(transient)
    assert not feed(guard, math.nan)  # replay is finite: the replayed step is applied
    assert transient.recomputes == 1 and guard.quarantine == set() and guard.replays == {"data": 0, "transient": 1}
    assert guard.events[0]["replay"] == "transient" and guard.summary()["skipped_steps"] == []
    data = FakeModule([math.nan, 2.0], [10, 11, 12], poisoned={11})
    guard = rollback_guard(data, rewarm_steps=3)
    assert not feed(guard, math.nan)  # replay NaN again -> quarantine 11 -> recomputed without it
    assert data.recomputes == 2 and data.excluded == [11] and guard.summary()["quarantined_keys"] == [11]
    assert guard.events[0]["quarantined"] == [11] and guard.replays == {"data": 1, "transient": 0}
    assert guard.rollbacks == 1 and guard.rewarm_left == 2  # the recomputed step was the first of the 3
    still = FakeModule([math.nan, math.nan], [10, 11], poisoned=set())  # nothing singled out: the whole step
    guard = rollback_guard(still)
    assert feed(guard, math.nan) and guard.quarantine == {10, 11} and guard.summary()["skipped_steps"] == [1]


def test_rewarm_scales_the_lr_of_the_updates_after_a_data_rollback() -> None:
    from types import SimpleNamespace

    guard = rollback_guard(FakeModule([math.nan, 2.0], [4], {4}), rewarm_steps=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    guard._trainer = SimpleNamespace(optimizers=[optimizer], global_step=0, is_global_zero=True)
    seen = []
    for loss in (math.nan, 2.0, 2.0):  # the rolled-back step, then two good ones
        optimizer.param_groups[0]["lr"] = 0.3  # what the schedule sets before each step
        feed(guard, loss)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == [pytest.approx(0.1), pytest.approx(0.2), 0.3]


def test_rollback_cap_stops_and_quarantine_round_trips_through_a_checkpoint() -> None:
    guard = rollback_guard(FakeModule([2.0] * 4, [1], set()), max_rollbacks=2)
    assert not feed(guard, math.nan) and not feed(guard, math.nan)
    assert feed(guard, math.nan) and "guard.max_rollbacks=2" in guard.stop_reason
    saved = rollback_guard(FakeModule([math.nan, 2.0], [5, 6], {5}))
    feed(saved, math.nan)
    state = saved.state_dict()
    assert state["quarantine"] == [5]
    resumed = StepGuard(GuardConfig(action="rollback", exclude_keys=[7]), "unused")
    resumed.load_state_dict(state)
    assert resumed.quarantine == {5, 7} and resumed.rollbacks == 1
    taken_back = StepGuard(GuardConfig(include_keys=[5]), "unused")
    taken_back.load_state_dict(state)
    assert taken_back.quarantine == set()
    every = StepGuard(GuardConfig(include_keys="all", exclude_keys=[3]), "unused")
    every.load_state_dict(state)
    assert every.quarantine == {3}


def test_watchdog_limit_follows_the_median_step_time_above_its_floor(tmp_path: Path) -> None:
    dog = HangWatchdog(str(tmp_path), timeout_s=3, median_multiple=10, warmup_steps=2)
    for t in (0.0, 50.0, 51.0):  # the first step (from t=0) and the second are warm-up: not counted
        dog._time_step(t)
    assert dog.limit_s == 3 and not dog.step_times
    for t in (51.2, 51.5, 51.7, 60.0):  # steps of 0.2, 0.3, 0.2 and one slow 8.3 s: median 0.25 s
        dog._time_step(t)
    assert dog.limit_s == 3  # 10 x the median 0.25 s is below the floor
    for t in (61.0, 62.0, 63.0, 64.0):  # 1 s steps: median 1 s -> 10 s
        dog._time_step(t)
    assert dog.limit_s == pytest.approx(10.0) and "median_multiple=10 x the median" in dog._limit_text()
    with pytest.raises(ConfigError, match="median_multiple"):
        HangWatchdog(str(tmp_path), median_multiple=0.5)


def test_straggler_ratio_compares_a_rank_with_the_others() -> None:
    assert straggler_ratios([1.0, 3.0]) == [pytest.approx(1 / 3), 3.0]  # two ranks: the other one
    assert straggler_ratios([1.0, 1.0, 1.2, 5.0])[3] == pytest.approx(5.0)
    assert straggler_ratios([2.0]) == [1.0]


def test_guard_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="guard.action"):
        GuardConfig(action="rollbak")
    with pytest.raises(ConfigError, match="include_keys"):
        GuardConfig(include_keys="some")
    with pytest.raises(ConfigError, match="max_rollbacks"):
        GuardConfig(max_rollbacks=0)
    with pytest.raises(ConfigError, match="min_history"):
        GuardConfig(window=10, min_history=20)
    with pytest.raises(ConfigError, match="unknown guard keys"):
        GuardConfig.from_dict({"treshold": 3})


# --- multi-process runs --------------------------------------------------------------------------
def args(data_dir: Path, out: Path, strategy: str, *extra: str, accumulation: int = 2) -> list[str]:
    micro, devices = 4, 2
    return [
        "train/pretrain.py", "experiment=smoke", f"data.dir={data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", f"trainer.devices={devices}", f"strategy={strategy}",
        f"trainer.max_steps={STEPS}", f"data.micro_batch_size={micro}",
        f"data.global_batch_size={micro * devices * accumulation}", "trainer.validate_every_steps=100",
        "callbacks.checkpoint.every_n_steps=2", "sample=null", "logger=csv", "resume=null", *extra,
    ]  # fmt: skip


def fault(kind: str, record: Path | None = None, name: str = "fault", **kw: object) -> str:
    """A FaultInjector override (at step BAD on rank 1 unless ``kw`` says otherwise); a second fault of
    the same run needs another callback ``name``."""
    fields = {"_target_": INJECT, "kind": kind, "step": BAD, "rank": 1, **kw}
    if record is not None:
        fields["record_dir"] = str(record)
    return f"+callbacks.{name}={{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed missing")
STRATEGIES = [
    "ddp",
    "fsdp",
    *(pytest.param(name, marks=DEEPSPEED) for name in ("deepspeed_stage_2", "deepspeed_stage_3")),
    *(pytest.param(name, marks=DEEPSPEED) for name in ("deepspeed_stage_2_offload", "deepspeed_stage_3_offload")),
]


@pytest.fixture(scope="module")
def faulty_run(
    request: pytest.FixtureRequest, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, str]:
    """One 2-process run of the strategy ``request.param`` (accumulation 2) with two faults on rank 1:
    a NaN loss at step BAD and a finite spike (loss x100) at step SPIKE, judged from 2 steps of
    history. Each rank records its weights around both steps. Returns (run, record folder, stdout)."""
    tmp = tmp_path_factory.mktemp(f"faults-{request.param}")
    out, record = tmp / "run", tmp / "record"
    nan, spike = fault("nan_loss", record), fault("scale_loss", record, "spike", step=SPIKE, factor=100)
    cmd = args(tiny_data_dir, out, request.param, nan, spike, "guard.min_history=2", "guard.window=2")
    return out, record, run_script(cmd, timeout=300).stdout


def recorded(record: Path, rank: int, *steps: int) -> list[dict[str, torch.Tensor]]:
    """A rank's local weights after each of ``steps`` (FaultInjector's record_dir)."""
    return [torch.load(record / f"weights-rank{rank}-step{s}.pt") for s in steps]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("faulty_run", STRATEGIES, indirect=True)
def test_nan_on_rank_1_is_skipped_by_every_rank(faulty_run: tuple[Path, Path, str]) -> None:
    """NaN loss on rank 1 only at step 3 (accumulation 2): both ranks drop that update, nothing hangs,
    the weights after step 3 equal those after step 2 on every rank, and training then goes on."""
    out, record, stdout = faulty_run
    assert f"guard: step {BAD}: non-finite loss on rank 1 and global gradient norm" in stdout
    for rank in (0, 1):
        decisions = json.loads((record / f"decisions-rank{rank}.json").read_text())
        assert decisions == {"skipped": [BAD, SPIKE], "steps": STEPS}, (rank, decisions)
        before, skipped, after = recorded(record, rank, BAD - 1, BAD, BAD + 1)
        for name in before:
            assert torch.equal(before[name], skipped[name]), (rank, name)
        assert any(not torch.equal(skipped[n], after[n]) for n in before), (rank, "no update after the skip")
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert guard["skipped_steps"] == [BAD, SPIKE] and guard["events"][0]["kind"] == "non_finite"
    assert guard["events"][0]["ranks"] == [1]
    rows = logged(out)  # the CSV's step column counts the steps done before the row's step
    counts = ["0.0"] * (BAD - 1) + ["1.0"] * (SPIKE - BAD) + ["2.0"] * (STEPS - SPIKE + 1)
    assert [rows[s]["guard/skipped_steps"] for s in range(STEPS)] == counts
    assert guard["stopped"] is None


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=DEEPSPEED)])
def test_in_bf16_a_nan_and_a_spike_are_dropped_by_every_rank(
    tiny_data_dir: Path, tmp_path: Path, strategy: str
) -> None:
    """The same two faults under bf16 autocast (DDP; DeepSpeed with its bf16 config): both steps are
    dropped on every rank and leave the weights as they were."""
    from cgpt.hardware import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("needs bf16 on the CPU (AVX512_BF16 or AMX): emulated bf16 makes this run take many minutes")
    out, record = tmp_path / "run", tmp_path / "record"
    nan, spike = fault("nan_loss", record), fault("scale_loss", record, "spike", step=SPIKE, factor=100)
    cmd = args(tiny_data_dir, out, strategy, nan, spike, "guard.min_history=2", "guard.window=2")
    cmd = ["trainer.precision=bf16-mixed" if a.startswith("trainer.precision=") else a for a in cmd]
    stdout = run_script(cmd, timeout=300).stdout
    assert "precision bf16-mixed" in stdout and f"guard: step {SPIKE}: loss spike" in stdout
    for rank in (0, 1):
        assert json.loads((record / f"decisions-rank{rank}.json").read_text()) == {
            "skipped": [BAD, SPIKE],
            "steps": STEPS,
        }
        for step in (BAD, SPIKE):
            before, dropped, after = recorded(record, rank, step - 1, step, step + 1)
            for name in before:
                assert torch.equal(before[name], dropped[name]), (rank, step, name)
            assert any(not torch.equal(dropped[n], after[n]) for n in before), (rank, step, "no update after it")
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert [e["kind"] for e in guard["events"]] == ["non_finite", "loss_spike"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("faulty_run", STRATEGIES, indirect=True)
def test_a_finite_spike_is_dropped_by_every_rank(faulty_run: tuple[Path, Path, str]) -> None:
    """A finite spike (loss x100 on rank 1 at step SPIKE) is dropped on every rank: the weights after
    the step equal those before it, and the next step updates them. Under DeepSpeed this is the test of
    the guard's gate inside the ZeRO step: DeepSpeed skips a non-finite fp32 step on its own, a finite
    spike only the gate can drop."""
    out, record, stdout = faulty_run
    assert f"guard: step {SPIKE}: loss spike" in stdout
    for rank in (0, 1):
        assert SPIKE in json.loads((record / f"decisions-rank{rank}.json").read_text())["skipped"]
        before, skipped, after = recorded(record, rank, SPIKE - 1, SPIKE, SPIKE + 1)
        for name in before:
            assert torch.equal(before[name], skipped[name]), (rank, name)
        assert any(not torch.equal(skipped[n], after[n]) for n in before), (rank, "no update after the spike")
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert [(e["step"], e["kind"]) for e in guard["events"]] == [(BAD, "non_finite"), (SPIKE, "loss_spike")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_saves_and_exits_with_its_code(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = args(tiny_data_dir, out, "ddp", fault("nan_loss"), "guard.action=stop", accumulation=1)
    proc = lightning_launched(cmd)
    assert proc.returncode == EXIT_GUARD_STOPPED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"guard: stopped at step {BAD}" in proc.stdout
    assert (out / "checkpoints" / "last.ckpt").exists()
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert guard["skipped_steps"] == [BAD] and "guard.action=stop" in guard["stopped"]


@pytest.fixture(scope="module")
def hung_run(
    tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess, bool, subprocess.CompletedProcess]:
    """Rank 1 sleeps in step 4 (DDP, no accumulation) under a watchdog whose limit follows the pace
    (30x the median step time after 1 warm-up step, above a 2 s floor); then the same command is run
    again without the fault. Returns (run folder, the hung run, whether it left last.ckpt, the re-run)."""
    out = tmp_path_factory.mktemp("hung") / "run"
    dog = ["watchdog.timeout_s=2", "watchdog.median_multiple=30", "watchdog.warmup_steps=1", "watchdog.grace_s=20"]
    base = args(tiny_data_dir, out, "ddp", *dog, accumulation=1)
    hung = lightning_launched([*base, fault("sleep", seconds=120, step=4)])
    saved = (out / "checkpoints" / "last.ckpt").exists()
    again = [a for a in base if a != "resume=null"]
    resumed = lightning_launched(again)
    return out, hung, saved, resumed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_watchdog_dumps_every_rank_names_the_sleeper_and_exits(
    hung_run: tuple[Path, subprocess.CompletedProcess, bool, subprocess.CompletedProcess],
) -> None:
    """Rank 1 sleeps in step 4: both ranks dump their stacks, the report says rank 1 is behind, the
    run exits with EXIT_HUNG, and re-running the same command resumes from the last checkpoint."""
    out, proc, saved, resumed = hung_run
    assert proc.returncode == EXIT_HUNG, proc.stdout[-3000:] + proc.stderr[-3000:]
    stacks = {r: (out / "hang" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "in _sleep" in stacks[1] and "fault_injection.py" in stacks[1]
    assert "in _sleep" not in stacks[0]
    report = (out / "hang" / "report.txt").read_text()
    assert "rank 1:" in report and "did NOT reach it" in report.split("rank 1:")[1].splitlines()[0]
    assert "reached the furthest point" in report.split("rank 0:")[1].splitlines()[0]
    assert "ranks [1] are behind" in report
    assert saved
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (STEPS, STEPS - 2)  # from the step-2 checkpoint


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_watchdog_median_multiple_limit_fires_on_a_sleeping_rank(
    hung_run: tuple[Path, subprocess.CompletedProcess, bool, subprocess.CompletedProcess],
) -> None:
    """Rank 1 sleeps in step 4: the limit in force is 30x the median step time (above the 2 s floor),
    and past it both ranks dump and the run exits with EXIT_HUNG."""
    out, proc, _, _ = hung_run
    assert proc.returncode == EXIT_HUNG, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "watchdog.median_multiple=30 x the median step time" in proc.stderr
    header = json.loads((out / "hang" / "rank1.txt").read_text().splitlines()[0])
    assert header["limit_s"] > 2 and header["idle_s"] >= header["limit_s"] and header["completed_steps"] == 3
    assert "in _sleep" in (out / "hang" / "rank1.txt").read_text()


def lightning_launched(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` as one process that starts the other rank itself (Lightning's launcher), whatever
    its exit code: these tests read the code rank 0 exits with."""
    return run_ranks(cmd, 1, run_env(), timeout=300)


def single(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train/pretrain.py", "experiment=smoke", f"data.dir={data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", "trainer.devices=1", "trainer.validate_every_steps=1000",
        "callbacks.checkpoint.every_n_steps=1000", "sample=null", "logger=csv", "resume=null", *extra,
    ]  # fmt: skip


def logged(out: Path) -> dict[int, dict[str, str]]:
    import csv

    rows: dict[int, dict[str, str]] = {}
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v and k != "step"})
    return rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_guard_changes_nothing_on_a_normal_run(
    single_process_run: tuple[Path, subprocess.CompletedProcess], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """On by default, so it must not move a loss: the same run with guard=off logs the same values (the
    run with the guard is the shared single-process run of conftest; the other is its command plus
    guard=off)."""
    on, off = single_process_run[0], tmp_path / "off"
    run_script(pretrain_args(tiny_data_dir, off, "auto", 1, SAMPLE_ON, "guard=off"), timeout=300)
    a, b = ({k: v for k, v in logged(out).items() if "train/loss" in v} for out in (on, off))
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for step in a:
        for key in ("train/loss", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key, a[step], b[step])
    assert json.loads((on / "summary.json").read_text())["guard"]["events"] == []
    assert json.loads((off / "summary.json").read_text())["guard"] == {"enabled": False}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_multiplied_loss_is_caught_by_the_default_spike_rule(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The default rule (8 std over the last good steps, from the 51st step on) flags a loss x10."""
    out, spike = tmp_path / "run", 58
    fault_arg = f"+callbacks.fault={{_target_: {INJECT}, kind: scale_loss, step: {spike}, rank: 0, factor: 10}}"
    run_script(single(tiny_data_dir, out, "trainer.max_steps=60", "trainer.log_every_n_steps=10", fault_arg))
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert [(e["step"], e["kind"]) for e in guard["events"]] == [(spike, "loss_spike")], guard["events"]
    assert guard["max_loss_z_of_a_good_step"] < 8.0


# --- rollback: replay, quarantine, resume ----------------------------------------------------------
ROLLBACK = "guard.action=rollback"


def quarantine_in_checkpoint(path: Path) -> list[int]:
    """The guard's quarantine saved in a checkpoint (a file, or a sharded folder's meta.pt)."""
    state = torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False, map_location="cpu")
    return state["callbacks"]["StepGuard"]["quarantine"]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def poisoned_run(data_dir: Path, out: Path, record: Path, strategy: str, *extra: str) -> tuple[str, int]:
    """A rollback run whose first sample of rank 1 in step BAD is poisoned (NaN loss every time it
    counts); returns its stdout and the poisoned key."""
    proc = run_script(args(data_dir, out, strategy, ROLLBACK, fault("poison", record), *extra), timeout=300)
    return proc.stdout, json.loads((record / "poisoned.json").read_text())[0]


@pytest.fixture(scope="module")
def ddp_rollback(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str]:
    """A DDP rollback run with a poisoned sample (step BAD) and a NaN on rank 1 at step TRANSIENT that
    does not reproduce on the replay, and its oracle: the same run with that key excluded from the
    start (guard.exclude_keys) and no fault. Returns (run, oracle, key, run's stdout)."""
    tmp = tmp_path_factory.mktemp("ddp_rollback")
    transient = fault("nan_loss", name="transient", step=TRANSIENT)
    stdout, key = poisoned_run(tiny_data_dir, tmp / "run", tmp / "record", "ddp", transient)
    run_script(args(tiny_data_dir, tmp / "oracle", "ddp", ROLLBACK, f"guard.exclude_keys=[{key}]"), timeout=300)
    return tmp / "run", tmp / "oracle", key, stdout


def check_quarantined(out: Path, key: int, transient: int = 0) -> None:
    """The run quarantined ``key`` at step BAD and applied the step without it (after it, ``transient``
    rollbacks whose replay did not reproduce)."""
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert guard["quarantined_keys"] == [key] and guard["rollbacks"] == 1 + transient, guard
    assert guard["replays"] == {"data": 1, "transient": transient} and guard["skipped_steps"] == []
    event = guard["events"][0]
    assert (event["step"], event["replay"], event["quarantined"], event["applied"]) == (BAD, "data", [key], True)
    assert len(guard["events"]) == 1 + transient, guard["events"]
    assert quarantine_in_checkpoint(out / "checkpoints" / "last.ckpt") == [key]
    assert logged(out)[STEPS - 1]["guard/quarantined_samples"] == "1.0"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_ddp(ddp_rollback: tuple[Path, Path, int, str]) -> None:
    """The poisoned sample's fault reproduces on replay, its key is quarantined (summary.json and the
    checkpoint), and the final weights equal those of a run that never counted that sample."""
    out, oracle, key, stdout = ddp_rollback
    assert f"guard: step {BAD}: non-finite loss on rank 1" in stdout and "reproduced (data)" in stdout
    check_quarantined(out, key, transient=1)  # the run's later fault: test_a_transient_fault_is_replayed_...
    assert max_difference(out / "checkpoints" / "last.ckpt", oracle / "checkpoints" / "last.ckpt") <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_fsdp(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The same under FSDP2 (sharded weights, optimizer state and gradients)."""
    out, oracle = tmp_path / "run", tmp_path / "oracle"
    _, key = poisoned_run(tiny_data_dir, out, tmp_path / "record", "fsdp")
    run_script(args(tiny_data_dir, oracle, "fsdp", ROLLBACK, f"guard.exclude_keys=[{key}]"), timeout=300)
    check_quarantined(out, key)
    assert max_difference(out / "checkpoints" / "last.ckpt", oracle / "checkpoints" / "last.ckpt") <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_transient_fault_is_replayed_not_quarantined(ddp_rollback: tuple[Path, Path, int, str]) -> None:
    """NaN once on rank 1 at step TRANSIENT of the DDP rollback run (not on the replay): logged as
    transient, nothing more quarantined, and the weights equal those of the oracle run, which had no
    such fault."""
    out, oracle, key, stdout = ddp_rollback
    line = next(line for line in stdout.splitlines() if f"guard: step {TRANSIENT}:" in line)
    assert "non-finite loss on rank 1" in line and "not reproduced (transient fault)" in line, line
    guard = json.loads((out / "summary.json").read_text())["guard"]
    assert guard["replays"] == {"data": 1, "transient": 1} and guard["quarantined_keys"] == [key]
    assert [(e["step"], e["replay"]) for e in guard["events"]] == [(BAD, "data"), (TRANSIENT, "transient")]
    assert guard["events"][1]["quarantined"] == [] and guard["skipped_steps"] == []
    rows = logged(out)  # the CSV's step column counts the steps done before the row's step
    assert [rows[s]["guard/transient_faults"] for s in (TRANSIENT - 2, STEPS - 1)] == ["0.0", "1.0"]
    assert max_difference(out / "checkpoints" / "last.ckpt", oracle / "checkpoints" / "last.ckpt") <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_during_a_rollback_leaves_a_resumable_run(
    tiny_data_dir: Path, tmp_path: Path, ddp_rollback: tuple[Path, Path, int, str]
) -> None:
    """Every rank is SIGKILLed in the middle of the rollback (after the quarantine is chosen, before the
    step is recomputed). Re-running the same command resumes from the last checkpoint, rolls back
    again and ends with the oracle's weights."""
    _, oracle, key, _ = ddp_rollback
    out, record = tmp_path / "run", tmp_path / "record"
    kill = "+callbacks.kill={_target_: " + INJECT + f", kind: kill, point: quarantine, rank: -1, record_dir: {record}}}"
    cmd = [a for a in args(tiny_data_dir, out, "ddp", ROLLBACK, fault("poison", record), kill) if a != "resume=null"]
    proc = lightning_launched(cmd)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "killed at the guard's 'quarantine' point" in proc.stdout
    assert not (out / "summary.json").exists()
    resumed = run_script(cmd, timeout=300)
    assert "resuming from" in resumed.stdout
    assert json.loads((record / "poisoned.json").read_text()) == [key]
    check_quarantined(out, key)
    assert max_difference(out / "checkpoints" / "last.ckpt", oracle / "checkpoints" / "last.ckpt") <= 1e-6


# --- watchdog: stragglers ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_slow_rank_is_reported_as_a_straggler_and_training_finishes(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Rank 1 sleeps 2 s in every step: reported every 2 steps (a line, the logged ratio, the
    ``watchdog`` section of summary.json), the run finishes. Sleeps from step 1 on and a ratio of 1.5:
    on a machine loaded ~6x over its cores a tiny forward took up to 2 s, and with one sleep in a
    window, or the default ratio of 2, a check missed the straggler."""
    out = tmp_path / "run"
    slow = fault("slow", seconds=2, step=1)
    dog = ["watchdog.straggler_every=2", "watchdog.straggler_ratio=1.5"]
    proc = run_script(args(tiny_data_dir, out, "ddp", *dog, slow, accumulation=1))
    lines = [line for line in proc.stdout.splitlines() if "straggler(s)" in line]
    assert [line.split(":")[1].strip() for line in lines] == ["step 2", "step 4", "step 6"], lines
    assert all("rank 1 " in line and "rank 0 " not in line for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert float(logged(out)[STEPS - 1]["watchdog/straggler_ratio"]) > 1.5
    stragglers = summary["watchdog"]["stragglers"]
    assert [(s["step"], s["rank"]) for s in stragglers] == [(2, 1), (4, 1), (6, 1)], stragglers
    assert all(s["ratio"] > 1.5 and s["forward_s"] > 4 for s in stragglers), stragglers  # two 2 s sleeps each
