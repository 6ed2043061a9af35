"""Loggers under real strategies: the sample table reaches TensorBoard under DDP, and Hydra's record
of the composed config lands beside the run's outputs wherever paths.output_dir points."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_script

from cgpt.strategies import SPECS


def test_which_strategies_hold_the_whole_model_on_rank_0() -> None:
    """The property the sample logger and the SFT export ask for (not a class name)."""
    whole = {name for name, spec in SPECS.items() if spec.holds_full_model}
    assert whole == {"auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload"}


def test_holds_full_model_of_built_strategies() -> None:
    from cgpt.strategies import build_strategy, holds_full_model

    assert holds_full_model(build_strategy({"name": "ddp"}, "cpu"))  # CgptDDPStrategy: the class-name test missed it
    assert not holds_full_model(build_strategy({"name": "fsdp"}, "cpu", devices=2))


@pytest.mark.slow
def test_ddp_run_logs_samples_to_tensorboard_and_keeps_its_hydra_record(tiny_data_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "elsewhere" / "run"
    run_name = f"test-loggers-{uuid.uuid4().hex[:8]}"
    run_script(["train/pretrain.py", "experiment=smoke", f"data.dir={tiny_data_dir}", "strategy=ddp",
                "trainer.devices=2", "logger=tensorboard", f"paths.output_dir={out}", f"run_name={run_name}",
                "sample.max_new_tokens=4", "trainer.precision=32-true"], timeout=400)  # fmt: skip
    (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # The metrics themselves: a train loss for each of the 6 steps, a val loss at each validation.
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars and "val/loss" in scalars, scalars
    train_loss = acc.Scalars("train/loss")
    assert len(train_loss) == 6 and train_loss[-1].value < train_loss[0].value, train_loss
    assert len(acc.Scalars("val/loss")) >= 2
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("samples") for t in tags), tags
    texts = [e for t in tags if t.startswith("samples") for e in acc.Tensors(t)]
    assert sorted(e.step for e in texts) == [3, 6]  # one sample per validation (smoke validates at 3 and 6)
    assert all(b"ROMEO:" in e.tensor_proto.string_val[0] for e in texts)
    # Hydra's record of this run's config is in the run's folder, not under outputs/<run_name>/.
    assert (out / "hydra" / "config.yaml").is_file() and run_name in (out / "hydra" / "config.yaml").read_text()
    assert not (REPO_ROOT / "outputs" / run_name).exists()
