"""cgpt.scaling_study and train/scaling_study.py: a 2-rung ladder end to end (train, collect, fit with
L_inf held, plot)."""

from __future__ import annotations

import json

import pytest
from conftest import run_script

from cgpt import scaling_study
from cgpt.scaling_study import StudyConfig, run_study


def test_ladder_parsing_and_budget():
    assert scaling_study.parse_ladder("1:16:1, 2:32:2") == [(1, 16, 1), (2, 32, 2)]
    with pytest.raises(SystemExit, match="divisible"):
        scaling_study.parse_ladder("1:30:4")
    cfg = scaling_study.rung_config(2, 32, 2, 128)
    b = scaling_study.rung_budget(cfg, 20, "non_embedding", 16, 128)
    non_emb = cfg.num_params() - (cfg.vocab_size + 128) * 32
    assert b["params_counted"] == non_emb and b["tokens"] == 20 * non_emb
    assert b["steps"] == -(-b["tokens"] // (16 * 128)) and 1 <= b["warmup"] < b["steps"]
    assert scaling_study.rung_budget(cfg, 20, "total", 16, 128)["params_counted"] == cfg.num_params()


def test_published_mode_writes_fit(tmp_path):
    res = run_study(StudyConfig(out=tmp_path, published=True))
    assert res["fit"]["alpha"] == pytest.approx(0.0737, rel=0.02)
    assert (tmp_path / "scaling_fit.png").stat().st_size > 1000
    assert (tmp_path / "scaling_table.md").read_text().count("cerebras-gpt-") == 7


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "hydra"])
def test_two_rung_study_end_to_end(tmp_path, tiny_data_dir, capsys, launcher):
    out = tmp_path / "study"
    proc = run_script(
        ["train/scaling_study.py", "--out", str(out), "--data", str(tiny_data_dir), "--ladder", "1:16:1,1:32:2",
         "--tokens-per-param", "0.5", "--batch-size", "8", "--val-batches", "2", "--launcher", launcher],
        timeout=170,
    )  # fmt: skip
    assert ("Hydra multirun of 2 rungs" in proc.stdout) == (launcher == "hydra")
    assert "holding it at 0" in proc.stdout
    res = json.loads((out / "scaling_fit.json").read_text())
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {"L1-d16", "L1-d32"}
    from cgpt.flops import training_flops

    seq_len, defaults = 64, StudyConfig(out=out)
    for name, shape in {"L1-d16": (1, 16, 1), "L1-d32": (1, 32, 2)}.items():
        r, cfg = runs[name], scaling_study.rung_config(*shape, seq_len)
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        # Each rung trained for the budget its shape gets (0.5 tokens per counted parameter), and the
        # fit's point is that run's tokens, FLOPs and validation loss.
        budget = scaling_study.rung_budget(cfg, 0.5, defaults.count, 8, seq_len)
        assert summary["steps"] == budget["steps"] >= 2, (name, summary["steps"], budget)
        assert r["tokens"] == summary["tokens_seen"] == budget["steps"] * 8 * seq_len, name
        assert summary["config"]["model"]["d_model"] == shape[1] and r["params"] == cfg.num_params(), name
        assert r["compute"] == pytest.approx(training_flops(cfg, r["tokens"], seq_len, defaults.flops), rel=1e-12)
        assert r["val_loss"] == summary["val_loss"] and 0 < r["val_loss"] < 11, name
        assert (out / "runs" / name / "hydra" / "config.yaml").is_file()  # Hydra's files stay in the study
    assert runs["L1-d32"]["compute"] > runs["L1-d16"]["compute"]
    fit = res["fit"]
    assert fit["l_inf_fixed"] and fit["l_inf"] == 0 and fit["n_points"] == 2
    assert fit["max_rel_error"] < 1e-6  # two points, two free parameters: exact
    assert (out / "scaling_fit.png").read_bytes()[:4] == b"\x89PNG"
    # Re-running skips the finished rungs and refits (in-process: nothing is trained).
    again = run_study(
        StudyConfig(out=out, data=tiny_data_dir, ladder="1:16:1,1:32:2", tokens_per_param=0.5, batch_size=8,
                    val_batches=2, launcher=launcher)
    )  # fmt: skip
    assert capsys.readouterr().out.count("done already") == 2
    assert again["fit"] == fit
