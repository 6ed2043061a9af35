"""bench/lm_head_loss.py: the head benchmark runs on a CPU, its variants agree, the GPU path skips."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT, run_script

from cgpt.lm_head import chunk_tokens

SCRIPT = REPO_ROOT / "bench" / "lm_head_loss.py"


@pytest.mark.slow
def test_head_benchmark_times_every_variant(tmp_path) -> None:
    out = tmp_path / "head.json"
    args = ["--tokens", "96", "--d-model", "16", "--vocab", "300", "--chunks", "auto", "32", "--repeats", "1"]
    proc = run_script([str(SCRIPT), *args, "--json", str(out)])
    result = json.loads(out.read_text())["result"]
    assert set(result) == {"full", f"fused/{chunk_tokens(300)}", "fused/32"}, result
    assert all(r["ms"] > 0 for r in result.values())
    losses = [r["loss"] for r in result.values()]
    assert max(losses) - min(losses) < 1e-3 * losses[0], losses  # the same loss, however computed
    assert "fused/32" in proc.stdout and "x" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs CUDA to be absent: it checks the no-GPU message")
def test_head_benchmark_skips_cuda_without_a_gpu() -> None:
    proc = run_script([str(SCRIPT), "--device", "cuda", "--repeats", "1"])
    assert proc.stdout.strip() == "skipped: CUDA is not available on this machine"
