"""guard.action=rollback under DeepSpeed ZeRO (2 gloo processes, fp32), by fault injection.

The gate runs inside the engine's step; a rollback drops that computation and recomputes the step
through the engine once the step has returned (cgpt.guard.StepGuard.run_deferred). The checks mirror
the DDP ones in test_guard.py: a poisoned sample is quarantined and the run ends with the weights of
a run that never counted it; a fault of one computation is replayed, not quarantined.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import run_script, weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed missing")

STEPS, BAD = 6, 3
INJECT = "cgpt.fault_injection.FaultInjector"
ROLLBACK = "guard.action=rollback"


def args(data_dir: Path, out: Path, strategy: str, *extra: str) -> list[str]:
    """6 steps of 2 processes x micro-batch 4 x accumulation 2, a checkpoint every 2 steps."""
    return [
        "train/pretrain.py", "experiment=smoke", f"data.dir={data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", "trainer.devices=2", f"strategy={strategy}",
        f"trainer.max_steps={STEPS}", "data.micro_batch_size=4", "data.global_batch_size=16",
        "trainer.validate_every_steps=100", "callbacks.checkpoint.every_n_steps=2", "sample=null", "logger=csv",
        "resume=null", *extra,
    ]  # fmt: skip


def fault(kind: str, record: Path | None = None, name: str = "fault", step: int = BAD) -> str:
    """A FaultInjector override on rank 1; a second fault of the same run needs another ``name``."""
    fields = {"_target_": INJECT, "kind": kind, "step": step, "rank": 1}
    if record is not None:
        fields["record_dir"] = str(record)
    return f"+callbacks.{name}={{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


TRANSIENT = 5  # a NaN once at this step (in training_step, which the replay does not call)


def faulty(data_dir: Path, out: Path, strategy: str, record: Path) -> list[str]:
    """A rollback run that meets a poisoned sample at step BAD and a transient NaN at step TRANSIENT."""
    return args(data_dir, out, strategy, ROLLBACK, fault("poison", record), fault("nan_loss", None, "nan", TRANSIENT))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def grad_norms(out: Path) -> list[float]:
    """The logged (pre-clip) gradient norm of every step, in step order."""
    import csv

    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("grad_norm")]
    return [float(row["grad_norm"]) for row in sorted(rows, key=lambda row: int(row["step"]))]


def max_difference(a: Path, b: Path) -> float:
    """The largest difference between the final weights of two runs (their last.ckpt)."""
    wa, wb = (weights(out / "checkpoints" / "last.ckpt") for out in (a, b))
    assert sorted(wa) == sorted(wb)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def client_state(out: Path) -> dict:
    """Rank 0's model-states file of the last checkpoint: DeepSpeed's counters and Lightning's state."""
    path = sorted((out / "checkpoints" / "last.ckpt" / "checkpoint").glob("*mp_rank_00_model_states.pt"))[0]
    return torch.load(path, weights_only=False, map_location="cpu")


def adam_steps(state: object) -> set[int]:
    """The step counts of every Adam state found in an optimizer state dict (any ZeRO layout)."""
    if isinstance(state, dict):
        if "exp_avg" in state and "step" in state:
            return {int(state["step"])}
        return set().union(set(), *(adam_steps(v) for v in state.values()))
    if isinstance(state, list | tuple):
        return set().union(set(), *(adam_steps(v) for v in state))
    return set()


def counters(out: Path) -> dict[str, object]:
    """The step counters a rollback must leave as if the good step had been taken once."""
    meta = client_state(out)
    steps: set[int] = set()
    for path in (out / "checkpoints" / "last.ckpt" / "checkpoint").glob("*optim_states.pt"):
        steps |= adam_steps(torch.load(path, weights_only=False, map_location="cpu")["optimizer_state_dict"])
    scheduler = meta["lr_schedulers"][0]
    return {"lightning": meta["global_step"], "deepspeed": meta["global_steps"], "skipped": meta["skipped_steps"],
            "samples": meta["global_samples"], "adam": sorted(steps), "schedule": scheduler["last_epoch"]}  # fmt: skip


EXPECTED = {"lightning": STEPS, "deepspeed": STEPS, "skipped": 0, "samples": STEPS * 16, "adam": [STEPS],
            "schedule": STEPS}  # fmt: skip


def check_quarantined(out: Path, key: int) -> None:
    """The run quarantined ``key`` at step BAD and applied the step without it, then replayed the
    transient NaN of step TRANSIENT without quarantining anything."""
    guard = summary(out)["guard"]
    assert guard["quarantined_keys"] == [key] and guard["rollbacks"] == 2, guard
    assert guard["replays"] == {"data": 1, "transient": 1} and guard["skipped_steps"] == []
    data, transient = guard["events"]
    assert (data["step"], data["replay"], data["quarantined"], data["applied"]) == (BAD, "data", [key], True)
    assert (transient["step"], transient["replay"], transient["quarantined"]) == (TRANSIENT, "transient", [])
    assert client_state(out)["callbacks"]["StepGuard"]["quarantine"] == [key]


@pytest.fixture(scope="module")
def oracle(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The key of the sample a poisoned run will meet (the first of rank 1 in step BAD; the data order
    is the same under every ZeRO stage), found by a stage-3 run with both faults, and the oracle: the
    same run without faults and with that key excluded from the start (a transient fault changes
    nothing). Returns (folder with run/ and oracle/, key, run's stdout)."""
    tmp = tmp_path_factory.mktemp("ds_rollback")
    record = tmp / "record"
    run = run_script(faulty(tiny_data_dir, tmp / "run", "deepspeed_stage_3", record))
    key = json.loads((record / "poisoned.json").read_text())[0]
    run_script(args(tiny_data_dir, tmp / "oracle", "deepspeed_stage_3", ROLLBACK, f"guard.exclude_keys=[{key}]"))
    return tmp, key, run.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_deepspeed_stage_3(oracle: tuple[Path, int, str]) -> None:
    """The poisoned sample's fault reproduces on the replay, its key is quarantined, the step is
    computed a third time without it and applied; the later NaN does not reproduce (transient, nothing
    quarantined, the replayed step applied). The final weights equal the oracle's, and the step
    counters (Lightning's, DeepSpeed's, Adam's, the schedule's) those of a run that took each step once."""
    tmp, key, stdout = oracle
    assert f"guard: step {BAD}: non-finite loss on rank 1" in stdout and "reproduced (data)" in stdout
    assert f"guard: step {TRANSIENT}: non-finite loss on rank 1" in stdout
    assert "not reproduced (transient fault)" in stdout
    check_quarantined(tmp / "run", key)
    assert max_difference(tmp / "run", tmp / "oracle") <= 1e-5
    assert counters(tmp / "run") == counters(tmp / "oracle") == EXPECTED
    # the recomputed steps' gradients at the oracle's scale (clipping and Adam would hide a factor):
    # equal to the last digit here
    assert grad_norms(tmp / "run") == pytest.approx(grad_norms(tmp / "oracle"), rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["deepspeed_stage_2_offload", "deepspeed_stage_3_offload"])
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_deepspeed_offload(
    tiny_data_dir: Path, tmp_path: Path, oracle: tuple[Path, int, str], strategy: str
) -> None:
    """The same with the optimizer offloaded (DeepSpeedCPUAdam; ZeRO-2's optimizer class is also
    stage 1's), against the stage-3 oracle: the stages differ by at most 2.5e-7 in the final weights."""
    tmp, key, _ = oracle
    out, record = tmp_path / "run", tmp_path / "record"
    proc = run_script(faulty(tiny_data_dir, out, strategy, record))
    assert json.loads((record / "poisoned.json").read_text()) == [key]
    assert "not reproduced (transient fault)" in proc.stdout
    check_quarantined(out, key)
    assert max_difference(out, tmp / "oracle") <= 1e-5
    assert counters(out) == EXPECTED
