"""Sweeps: a local Hydra multirun writes one summary.json per point, cgpt.sweep_results (train/collect.py)
tabulates a sweep folder sorted by validation loss, and the SLURM launcher / Optuna sweeper configs compose."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cgpt.sweep_results import collect, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]


def _point(folder: Path, overrides: list[str], **summary: float | None) -> None:
    (folder / "hydra").mkdir(parents=True)
    (folder / "hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "summary.json").write_text(json.dumps({"steps": 10, **summary}))


def test_collect_sorts_by_val_loss_and_shows_varied_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _point(tmp_path / "0", ["experiment=smoke", "optim.lr=0.001"], val_loss=3.5, train_loss=3.4)
    _point(tmp_path / "1", ["experiment=smoke", "optim.lr=0.003"], val_loss=3.1, train_loss=3.0)
    _point(tmp_path / "2", ["experiment=smoke", "optim.lr=0.01"], val_loss=None, train_loss=9.0)  # diverged
    columns, rows = collect(tmp_path)
    assert columns[:2] == ["point", "optim.lr"] and "experiment" not in columns  # only what varies
    assert [r["point"] for r in rows] == ["1", "0", "2"]
    write_results(tmp_path)
    md = capsys.readouterr().out
    assert md.splitlines()[0].startswith("| point | optim.lr | val_loss")
    assert md.index("| 1 | 0.003 | 3.1") < md.index("| 0 | 0.001 | 3.5")
    with open(tmp_path / "results.csv") as f:
        assert [r["optim.lr"] for r in csv.DictReader(f)] == ["0.003", "0.001", "0.01"]
    assert (tmp_path / "results.md").read_text() == md.split("\n\n")[0] + "\n"


def test_collect_refuses_a_folder_without_summaries(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no summary.json"):
        collect(tmp_path)


def _compose(overrides: list[str]):
    os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_slurm_launcher_config_runs_one_task_per_device() -> None:
    cfg = _compose(["hydra/launcher=cgpt_slurm", "trainer.devices=8", "trainer.num_nodes=2", "run_name=sw"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == 8 and launcher["nodes"] == 2
    assert launcher["submitit_folder"].endswith("multirun/sw/.submitit/%j")


def test_optuna_sweeper_config_composes() -> None:
    cfg = _compose(["hydra/sweeper=cgpt_optuna", "experiment=smoke"])
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["direction"] == "minimize" and sweeper["study_name"] == "smoke"
    assert "optim.lr" in sweeper["params"]


@pytest.mark.slow
def test_local_multirun_writes_one_summary_per_point_then_collects(tiny_data_dir: Path, tmp_path: Path) -> None:
    from conftest import run_script

    sweep = tmp_path / "sweep"
    run_script(["train/pretrain.py", "-m", "experiment=smoke", f"data.dir={tiny_data_dir}", "optim.lr=1e-3,3e-3",
                "sample=null", "trainer.max_steps=4", "trainer.validate_every_steps=2",
                "callbacks.checkpoint.every_n_steps=2", f"hydra.sweep.dir={sweep}"], timeout=400)  # fmt: skip
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"]
    assert {s["config"]["optim"]["lr"] for s in summaries.values()} == {1e-3, 3e-3}
    assert all(s["config"]["paths"]["output_dir"] == str(sweep / k) for k, s in summaries.items())
    assert all((sweep / k / "checkpoints" / "last.ckpt").is_file() for k in summaries)  # no shared folders
    proc = run_script(["train/collect.py", str(sweep)])
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert [float(r["val_loss"]) for r in rows] == sorted(s["val_loss"] for s in summaries.values())
    assert {r["optim.lr"] for r in rows} == {"0.001", "0.003"} and "| point | optim.lr |" in proc.stdout


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_reports_the_best(tiny_data_dir: Path, tmp_path: Path) -> None:
    """hydra/sweeper=cgpt_optuna end to end: two trials with lrs drawn from the search space, and
    Optuna's best value is the lowest final validation loss the trials returned."""
    import yaml
    from conftest import run_script

    sweep = tmp_path / "optuna"
    run_script(["train/pretrain.py", "-m", "hydra/sweeper=cgpt_optuna", "experiment=smoke", f"data.dir={tiny_data_dir}",
                "hydra.sweeper.n_trials=2", "sample=null", "logger=none", "trainer.max_steps=2",
                "trainer.validate_every_steps=2", "callbacks.checkpoint.every_n_steps=2",
                f"hydra.sweep.dir={sweep}"], timeout=400)  # fmt: skip
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2
    lrs = [s["config"]["optim"]["lr"] for s in summaries]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 3e-2 for lr in lrs), lrs
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [s["val_loss"] for s in summaries]
    best_trial = losses.index(min(losses))
    assert best["best_value"] == pytest.approx(losses[best_trial], rel=1e-6), (best, losses)
    assert best["best_params"]["optim.lr"] == pytest.approx(lrs[best_trial], rel=1e-9), (best, lrs)


def _slurm_env() -> dict[str, str] | None:
    """The environment for sbatch against the local test cluster (slurm/local_cluster.sh), or None
    when no controller answers."""
    import shutil
    import subprocess

    env = dict(os.environ)
    default = Path(os.environ.get("CGPT_SLURM_DIR", "/tmp/cgpt-slurm")) / "slurm.conf"
    if "SLURM_CONF" not in env and default.is_file():
        env["SLURM_CONF"] = str(default)
    if not shutil.which("sbatch"):
        return None
    try:
        ok = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return env if ok.returncode == 0 and ok.stdout.strip() else None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_launcher_sweep_runs_each_point_as_a_job(tiny_data_dir: Path, tmp_path: Path) -> None:
    """hydra/launcher=cgpt_slurm end to end on the local cluster: a two-point sweep submits two SLURM
    jobs through submitit, each trains in its own sweep folder and returns its validation loss."""
    import subprocess
    import sys

    env = _slurm_env()
    if env is None:
        pytest.skip("no SLURM controller reachable (run slurm/local_cluster.sh start)")
    sweep = tmp_path / "slurm_sweep"
    env = {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    args = ["train/pretrain.py", "-m", "hydra/launcher=cgpt_slurm", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10", "experiment=smoke", f"data.dir={tiny_data_dir}", "optim.lr=1e-3,3e-3",
            "sample=null", "logger=none", "trainer.max_steps=2", "trainer.validate_every_steps=2",
            "callbacks.checkpoint.every_n_steps=2", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=540)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"], sorted(p.name for p in sweep.iterdir())
    assert {s["config"]["optim"]["lr"] for s in summaries.values()} == {1e-3, 3e-3}
    assert all(s["steps"] == 2 and s["val_loss"] is not None for s in summaries.values())
    # Each point ran as a task of one SLURM job array (submitit's folders <job>_<task>) and returned
    # its result from there.
    tasks = sorted(d.name for d in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name))
    assert len(tasks) == 2 and tasks[0].split("_")[0] == tasks[1].split("_")[0], tasks
    for task in tasks:
        log = next((sweep / ".submitit" / task).glob("*_log.out")).read_text()
        assert "Job completed successfully" in log and "summary: " in log, log[-2000:]
