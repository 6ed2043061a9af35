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


def fault(kind: str, record: Path | None = None) -> str:
    fields = {"_target_": INJECT, "kind": kind, "step": BAD, "rank": 1}
    if record is not None:
        fields["record_dir"] = str(record)
    return "+callbacks.fault={" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


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
    guard = summary(out)["guard"]
    assert guard["quarantined_keys"] == [key] and guard["rollbacks"] == 1, guard
    assert guard["replays"] == {"data": 1, "transient": 0} and guard["skipped_steps"] == []
    (event,) = guard["events"]
    assert (event["step"], event["replay"], event["quarantined"], event["applied"]) == (BAD, "data", [key], True)
    assert client_state(out)["callbacks"]["StepGuard"]["quarantine"] == [key]


@pytest.fixture(scope="module")
def oracle(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The key of the sample a poisoned run will meet (the first of rank 1 in step BAD; the data order
    is the same under every ZeRO stage), found by a stage-3 rollback run, and the oracle: the same run
    with that key excluded from the start. Returns (folder with run/ and oracle/, key, run's stdout)."""
    tmp = tmp_path_factory.mktemp("ds_rollback")
    record = tmp / "record"
    run = run_script(args(tiny_data_dir, tmp / "run", "deepspeed_stage_3", ROLLBACK, fault("poison", record)))
    key = json.loads((record / "poisoned.json").read_text())[0]
    run_script(args(tiny_data_dir, tmp / "oracle", "deepspeed_stage_3", ROLLBACK, f"guard.exclude_keys=[{key}]"))
    return tmp, key, run.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_deepspeed_stage_3(oracle: tuple[Path, int, str]) -> None:
    """The poisoned sample's fault reproduces on the replay, its key is quarantined, the step is
    computed a third time without it and applied: the final weights equal the oracle's, and the step
    counters (Lightning's, DeepSpeed's, Adam's, the schedule's) those of a run that took each step once."""
    tmp, key, stdout = oracle
    assert f"guard: step {BAD}: non-finite loss on rank 1" in stdout and "reproduced (data)" in stdout
    check_quarantined(tmp / "run", key)
    assert max_difference(tmp / "run", tmp / "oracle") <= 1e-5
    assert counters(tmp / "run") == counters(tmp / "oracle") == EXPECTED


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollback_quarantines_a_bad_sample_like_an_oracle_run_deepspeed_stage_2_offload(
    tiny_data_dir: Path, tmp_path: Path, oracle: tuple[Path, int, str]
) -> None:
    """The same under ZeRO-2 with the optimizer offloaded (DeepSpeedCPUAdam), against the stage-3
    oracle: the stages differ by at most 2.5e-7 in the final weights here."""
    tmp, key, _ = oracle
    out, record = tmp_path / "run", tmp_path / "record"
    run_script(args(tiny_data_dir, out, "deepspeed_stage_2_offload", ROLLBACK, fault("poison", record)))
    assert json.loads((record / "poisoned.json").read_text()) == [key]
    check_quarantined(out, key)
    assert max_difference(out, tmp / "oracle") <= 1e-5
    assert counters(out) == EXPECTED


@pytest.fixture(scope="module")
def clean(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ZeRO-2 rollback run without a fault: the reference of the transient-fault runs."""
    out = tmp_path_factory.mktemp("ds_clean") / "run"
    run_script(args(tiny_data_dir, out, "deepspeed_stage_2", ROLLBACK))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_3_offload"])
def test_a_transient_fault_is_replayed_not_quarantined_deepspeed(
    tiny_data_dir: Path, tmp_path: Path, clean: Path, strategy: str
) -> None:
    """NaN once on rank 1 (in training_step, which the replay does not call: the replay is clean, as
    under DDP): logged as transient, nothing quarantined, the replayed step applied, and the weights
    and step counters equal those of the run without the fault."""
    out = tmp_path / "run"
    proc = run_script(args(tiny_data_dir, out, strategy, ROLLBACK, fault("nan_loss")))
    assert "not reproduced (transient fault)" in proc.stdout
    guard = summary(out)["guard"]
    assert guard["replays"] == {"data": 0, "transient": 1} and guard["quarantined_keys"] == []
    assert [(e["step"], e["replay"]) for e in guard["events"]] == [(BAD, "transient")]
    assert guard["skipped_steps"] == []
    assert max_difference(out, clean) <= 1e-5
    assert counters(out) == counters(clean) == EXPECTED
