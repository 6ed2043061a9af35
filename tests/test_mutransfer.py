"""cgpt.mutransfer: a tiny lr x width grid under SP and muP runs and writes its plot and table."""

from __future__ import annotations

import json
import math

import pytest

from cgpt import mutransfer
from cgpt.mutransfer import MuTransferConfig


def test_best_lrs_ignores_divergence():
    results = [
        {"param": "sp", "width": 32, "lr": 1e-3, "loss": 5.0},
        {"param": "sp", "width": 32, "lr": 1e-2, "loss": 4.0},
        {"param": "sp", "width": 32, "lr": 1e-1, "loss": math.nan},
        {"param": "mup", "width": 32, "lr": 1e-2, "loss": 4.5},
    ]
    assert mutransfer.best_lrs(results) == {"sp": {32: 1e-2}, "mup": {32: 1e-2}}


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_tiny_grid_smoke(tmp_path, tiny_data_dir):
    out = tmp_path / "mt"
    summary = mutransfer.run_mutransfer(
        MuTransferConfig(data=str(tiny_data_dir), out=str(out), widths=[32, 64], lrs=[1e-3, 1e-2], steps=3,
                         batch_size=2, seq_len=32, vocab=256, head_dim=16)
    )  # fmt: skip
    assert len(summary["results"]) == 2 * 2 * 2
    assert all(len(r["curve"]) == 3 and math.isfinite(r["loss"]) for r in summary["results"])
    # same seed and batches: the two parametrizations really differ (muP multipliers are applied)
    sp = {(r["width"], r["lr"]): r["loss"] for r in summary["results"] if r["param"] == "sp"}
    mup = {(r["width"], r["lr"]): r["loss"] for r in summary["results"] if r["param"] == "mup"}
    assert sp.keys() == mup.keys() and any(abs(sp[k] - mup[k]) > 1e-4 for k in sp)
    assert set(summary["best_lr"]) == {"sp", "mup"}
    assert (out / "mutransfer.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "mutransfer.json").read_text())["args"]["steps"] == 3
    assert "| sp |" in (out / "mutransfer.md").read_text()


def test_vocab_remap_keeps_frequent_ids(tiny_data_dir):
    tokens = mutransfer.load_tokens(tiny_data_dir, 8, 32, 100)
    assert tokens.shape == (8, 33) and int(tokens.max()) <= 100 and int(tokens.min()) >= 0
    assert (tokens < 100).float().mean() > 0.5  # the 100 most frequent ids cover most tokens
    with pytest.raises(SystemExit, match="exceeds"):
        mutransfer.load_tokens(tiny_data_dir, 8, 4096, 100)
