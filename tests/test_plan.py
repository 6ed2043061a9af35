"""The planner's command line: cgpt.planning.plan_cli and the train/plan.py script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgpt.planning import parse_plan_args, plan_cli

ROOT = Path(__file__).resolve().parents[1]


def test_parse_args_types_and_errors():
    args = parse_plan_args(["model=cerebras_gpt_1.3b", "gpus=64", "--gpu", "H100", "mfu=0.4", "json=true"])
    assert args == {"model": "cerebras_gpt_1.3b", "gpus": 64, "gpu": "H100", "mfu": 0.4, "json": True}
    with pytest.raises(SystemExit, match="key=value"):
        parse_plan_args(["bogus=1"])
    with pytest.raises(SystemExit, match="gpus"):
        parse_plan_args(["gpus=many"])


def test_plan_json_for_preset(capsys):
    plan_cli(["model=cerebras_gpt_1.3b", "gpus=64", "gpu=H100", "mfu=0.4", "json=true"])
    out = json.loads(capsys.readouterr().out)
    assert out["batch_size"] == 528 and out["gpus"] == 64
    assert abs(out["train_flops"] / 2.8e20 - 1) < 0.1
    assert {"ddp", "fsdp", "deepspeed_stage_3"} <= set(out["memory"])
    assert out["wall_time_s"] > 0


def test_plan_custom_shape_needs_full_shape():
    with pytest.raises(SystemExit, match="n_head"):
        plan_cli(["d_model=512", "n_layer=8"])


@pytest.mark.slow
def test_plan_cli_runs_as_script():
    r = subprocess.run(
        [sys.executable, str(ROOT / "train/plan.py"), "compare=true"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("cerebras-gpt-") == 7
