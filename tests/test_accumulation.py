"""Gradient accumulation gives the same training under every strategy (2 gloo CPU processes, fp32).

Lightning divides the training loss by ``accumulate_grad_batches``; DeepSpeed's ``engine.backward``
used to divide it by ``gradient_accumulation_steps`` once more, so ZeRO gradients were 1/accumulation
of DDP's, clipping (gradient_clip_val 1.0) no longer acted the same and the losses drifted by ~2e-4
from the first real update. Here the per-step losses and the logged pre-clip ``grad_norm`` must agree.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_script

STEPS = 4
TOL = 1e-5


def metrics(out: Path) -> dict[int, dict[str, float]]:
    """Per step (optimizer steps done before it): rank 0's logged values, merged over rows."""
    result: dict[int, dict[str, float]] = {}
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key in ("train/loss", "grad_norm"):
                    if row.get(key):
                        result.setdefault(int(row["step"]), {})[key] = float(row[key])
    return result


def run(data_dir: Path, out: Path, strategy: str, accumulation: int) -> dict[int, dict[str, float]]:
    micro, devices = 4, 2
    run_script([
        "train/pretrain.py", "experiment=smoke", f"data.dir={data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", f"trainer.devices={devices}", f"strategy={strategy}",
        f"trainer.max_steps={STEPS}", f"data.micro_batch_size={micro}",
        f"data.global_batch_size={micro * devices * accumulation}", "data.val_batches=2",
        "trainer.log_every_n_steps=1", "trainer.validate_every_steps=100", "callbacks.checkpoint.every_n_steps=100",
        "sample=null", "logger=csv", "resume=null",
    ], timeout=400)  # fmt: skip
    return metrics(out)


def test_deepspeed_backward_does_not_divide_by_the_accumulation_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's closure divides the loss by accumulate_grad_batches: the engine must not."""
    from lightning.pytorch.strategies import Strategy

    from cgpt.strategies.deepspeed import CgptDeepSpeedStrategy

    seen = {}
    monkeypatch.setattr(Strategy, "backward", lambda self, loss, optimizer, *a, **kw: seen.update(kw) or loss)
    strategy = CgptDeepSpeedStrategy(stage=2)
    strategy.backward(torch.ones(()), None)
    assert seen == {"scale_wrt_gas": False}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("accumulation", [2])  # 1 was never affected; 4 drifts the same way as 2
def test_accumulated_steps_match_across_strategies(tiny_data_dir: Path, tmp_path: Path, accumulation: int) -> None:
    ref = run(tiny_data_dir, tmp_path / "ddp", "ddp", accumulation)
    assert sorted(ref) == list(range(STEPS))
    assert ref[0]["grad_norm"] > 1.0  # clipping at gradient_clip_val=1.0 is active: a scale error would show
    for name in ("deepspeed_stage_2", "deepspeed_stage_3"):
        got = run(tiny_data_dir, tmp_path / name, name, accumulation)
        assert sorted(got) == sorted(ref), (name, got)
        for step in ref:
            assert abs(got[step]["train/loss"] - ref[step]["train/loss"]) < TOL, (name, step, got[step], ref[step])
            # DeepSpeed logs the pre-clip norm of its own step. DDP's comes from torch's fp32 norm, which on
            # one CPU thread is off by up to ~3e-4 relative on the (50257, 64) embedding gradient.
            assert "grad_norm" in got[step], (name, step, got[step])
            assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-3), (name, step)
