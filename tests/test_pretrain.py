"""End to end: train/pretrain.py on a tiny corpus writes summary.json and checkpoints, a re-run of
the same command resumes instead of starting over, and bf16 trains like fp32 on a CPU that has it."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import pretrain_args, run_script

pytestmark = pytest.mark.slow


def _pretrain(data_dir: Path, out: Path, *extra: str, precision: str = "32-true"):
    return run_script(
        [
            "train/pretrain.py",
            "experiment=smoke",
            f"data.dir={data_dir}",
            f"paths.output_dir={out}",
            "data.num_workers=0",
            f"trainer.precision={precision}",
            *extra,
        ],  # fmt: skip
        timeout=300,
    )


def test_pretrain_writes_summary_and_checkpoints_then_resumes(
    single_process_run, tiny_data_dir: Path, tmp_path: Path
) -> None:
    shared, proc = single_process_run  # experiment=smoke, 6 steps, fp32, checkpoints every 2 steps
    out = tmp_path / "run"
    shutil.copytree(shared, out)  # the shared run stays as it is: this test re-runs in its copy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["tokens_seen"] == 6 * 8 * 64  # steps x global batch x seq_len
    assert summary["train_loss"] < math.log(50257) and summary["val_loss"] < math.log(50257)
    # perplexity is exp of the per-token mean loss (not the mean of per-batch perplexities)
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert summary["tokens_per_sec"] > 0 and summary["wall_time_sec"] > 0
    assert summary["config"]["model"]["name"] == "cerebras-gpt-tiny"
    assert summary["config"]["resolved"]["accumulate_grad_batches"] == 2
    assert summary["sample"].startswith("ROMEO:")
    assert "val loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert "`srun` command is available" not in proc.stderr  # outside a SLURM job it is noise
    first = proc.stdout.splitlines()[:3]  # the run's first lines: its decisions for this machine
    assert first[0] == "precision 32-true: set by trainer.precision", first
    assert first[1].startswith("compile off (auto)")
    assert first[2].startswith("fused LM-head loss ") and "measured on this CPU" in first[2], first
    for noise in ("💡 Tip", "LeafSpec", "GPU available: False", "Automatic Mixed Precision"):
        assert noise not in proc.stdout + proc.stderr, noise
    ckpts = out / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-*.ckpt"))
    metrics = (next((out / "csv").glob("version_*")) / "metrics.csv").read_text()
    for key in ("train/loss", "val/loss", "lr", "tokens_seen", "tokens_per_sec", "mfu", "grad_norm"):
        assert key in metrics.splitlines()[0], key

    # Same command, more steps: continues from step 6 rather than starting over.
    proc = run_script(pretrain_args(tiny_data_dir, out, "auto", 1, "trainer.max_steps=8"), timeout=300)
    assert "resuming from" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["steps_this_run"] == 2


def test_bad_settings_fail_before_training_with_the_fix(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as err:
        _pretrain(tiny_data_dir, tmp_path / "a", "data.global_batch_size=10")
    assert "not divisible" in str(err.value) and "micro_batch_size" in str(err.value)
    with pytest.raises(AssertionError) as err:
        _pretrain(tiny_data_dir, tmp_path / "b", "data.seq_len=128")
    assert "--seq-len 128" in str(err.value)
    with pytest.raises(AssertionError) as err:
        _pretrain(tmp_path / "missing", tmp_path / "c")
    assert "data/prepare.py" in str(err.value)


def _step_losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_bf16_trains_like_fp32_on_a_cpu_with_bf16(single_process_run, tiny_data_dir: Path, tmp_path: Path) -> None:
    from cgpt.hardware import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("needs bf16 on the CPU (AVX512_BF16 or AMX_BF16 in /proc/cpuinfo)")
    fp32, bf16 = single_process_run[0], tmp_path / "bf16"
    proc = run_script(pretrain_args(tiny_data_dir, bf16, "auto", 1, "trainer.precision=bf16-mixed"), timeout=300)
    assert "bf16" in proc.stdout + proc.stderr
    summary = json.loads((bf16 / "summary.json").read_text())
    assert summary["config"]["resolved"]["precision"] == "bf16-mixed"
    a, b = _step_losses(fp32), _step_losses(bf16)
    assert sorted(a) == sorted(b) == list(range(6))
    assert b[5] < b[0] - 0.05, b  # it learns
    # Measured: 1.1e-5 to 1.1e-4 over the 6 steps (autocast keeps the loss and the weights in fp32);
    # a broken bf16 path moves them by far more.
    for step in a:
        assert abs(a[step] - b[step]) < 1e-3, (step, a[step], b[step])
    assert a != b  # it really computed in bf16: an fp32 re-run is bitwise equal (runs are deterministic)
