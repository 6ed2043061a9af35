"""End to end: train/pretrain.py on a tiny corpus writes summary.json and checkpoints, and a
re-run of the same command resumes instead of starting over."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow


def _pretrain(data_dir: Path, out: Path, *extra: str):
    return run_script(
        [
            "train/pretrain.py",
            "experiment=smoke",
            f"data.dir={data_dir}",
            f"paths.output_dir={out}",
            "data.num_workers=0",
            "trainer.precision=32-true",
            *extra,
        ],  # fmt: skip
        timeout=300,
    )


def test_pretrain_writes_summary_and_checkpoints_then_resumes(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _pretrain(tiny_data_dir, out)
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
    proc = _pretrain(tiny_data_dir, out, "trainer.max_steps=8")
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
