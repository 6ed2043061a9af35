"""Preflight: impossible strategy/precision/memory settings fail before any process starts, saying
what to change; the memory estimate follows each strategy's sharding."""

from __future__ import annotations

import pytest

from cgpt.config import ConfigError, ModelConfig
from cgpt.memory import GIB, estimate_memory
from cgpt.preflight import check_run, check_torchrun, plan_batch

TINY = ModelConfig.from_name("cerebras-gpt-tiny")
BIG = ModelConfig.from_name("cerebras-gpt-13b")


def _check(strategy: dict, precision: str = "32-true", devices: int = 2, model: ModelConfig = TINY, **kw):
    trainer = {"accelerator": "cpu", "devices": devices, "num_nodes": 1, "precision": precision}
    return check_run(model, strategy, trainer, plan_batch(8, 4, devices), 64, verbose=False, **kw)


def test_offload_without_deepspeed_is_rejected_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="deepspeed_stage_2_offload"):
        _check({"name": "fsdp", "offload_optimizer": True})
    with pytest.raises(ConfigError, match="only available with DeepSpeed"):
        _check({"name": "ddp", "offload_parameters": True})
    with pytest.raises(ConfigError, match="stage 3"):
        _check({"name": "deepspeed", "stage": 2, "offload_parameters": True})


def test_precision_the_accelerator_lacks_is_rejected() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        _check({"name": "ddp"}, precision="16-mixed")
    with pytest.raises(ConfigError, match="fsdp supports"):
        _check({"name": "fsdp"}, precision="64-true")
    with pytest.raises(ConfigError, match="num_nodes"):
        _check({"name": "fsdp", "sharding": "hybrid"})


def test_a_model_that_does_not_fit_is_rejected_with_the_estimate() -> None:
    with pytest.raises(ConfigError, match=r"will not fit.*strategy=fsdp"):
        _check({"name": "ddp"}, model=BIG, memory_limit_bytes=80 * GIB)
    est = _check({"name": "ddp"}, memory_limit_bytes=80 * GIB)
    assert 0 < est.device_total < 80 * GIB
    assert "memory per device (ddp)" in est.format()


def test_memory_estimate_shrinks_with_sharding_and_offload() -> None:
    def total(strategy: dict, precision: str = "bf16-mixed", devices: int = 8) -> float:
        return estimate_memory(BIG, strategy, precision, 1, 2048, devices=devices).device_total

    n = BIG.num_params()
    ddp = estimate_memory(BIG, {"name": "ddp"}, "bf16-mixed", 1, 2048, devices=8)
    assert ddp.params == 4 * n and ddp.grads == 4 * n and ddp.optimizer == 8 * n  # fp32 weights + AdamW
    z1 = estimate_memory(BIG, {"name": "deepspeed", "stage": 1}, "bf16-mixed", 1, 2048, devices=8)
    z3 = estimate_memory(BIG, {"name": "deepspeed", "stage": 3}, "bf16-mixed", 1, 2048, devices=8)
    assert z1.optimizer == 12 * n / 8 and z1.params == 2 * n and z3.params == 2 * n / 8
    off = estimate_memory(BIG, {"name": "deepspeed", "stage": 3, "offload_optimizer": True,
                                "offload_parameters": True}, "bf16-mixed", 1, 2048, devices=8)  # fmt: skip
    assert off.optimizer == 0 and off.params == 0 and off.host_offload > 0
    fsdp = total({"name": "fsdp"})
    assert fsdp < ddp.device_total / 4
    assert total({"name": "fsdp", "sharding": "hybrid"}, devices=8) == pytest.approx(fsdp)  # one node: same
    ac = total({"name": "fsdp", "activation_checkpointing": True})
    assert ac < fsdp


def test_estimate_is_printed_by_the_preflight(capsys: pytest.CaptureFixture) -> None:
    trainer = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true"}
    check_run(TINY, {"name": "auto"}, trainer, plan_batch(8, 4, 1), 64)
    assert "preflight: memory per device (auto)" in capsys.readouterr().out


def test_a_world_size_that_cannot_split_the_global_batch_names_the_ones_that_can() -> None:
    with pytest.raises(ConfigError, match=r"trainer.devices in \[1, 2, 4\].*world sizes \[1, 2, 4\]"):
        plan_batch(16, 4, 3)
    with pytest.raises(ConfigError, match=r"trainer.devices in \[1, 2\] \(with trainer.num_nodes=2\)"):
        plan_batch(16, 4, 3, num_nodes=2)
    assert plan_batch(16, 4, 2).accumulate_grad_batches == 2  # the global batch stays; accumulation adapts
    assert plan_batch(16, 4, 1).accumulate_grad_batches == 4


def test_a_torchrun_layout_that_differs_from_the_trainer_is_refused_with_the_fix() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    check_torchrun(4, 2, torchrun)  # 2 nodes x 4 processes: matches
    check_torchrun(1, 1, {})  # not under torchrun: nothing to check
    with pytest.raises(
        ConfigError, match=r"torchrun started 8 processes \(4 per node, 2 node\(s\)\) but trainer.devices=8"
    ):
        check_torchrun(8, 1, torchrun)
    with pytest.raises(ConfigError, match="set trainer.devices to torchrun's --nproc-per-node"):
        check_torchrun(4, 1, torchrun)
