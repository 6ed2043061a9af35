"""sbatch rendering (against committed expected scripts), the resource preflight, and the signal ->
checkpoint -> stop path of the preemption callback (no SLURM needed; see test_slurm_cluster.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import load_script

from cgpt.config import ConfigError
from cgpt.slurm import SlurmConfig, check_environment, check_resources, parse_time, render_sbatch, requeue_job_id

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED = REPO_ROOT / "tests" / "expected"
COMMON = ["paths.root_dir=/srv/cgpt", "slurm.python=python"]
CASES = {
    # One node, 8 GPUs, the demo model.
    "single_node_8gpu": ["slurm.gpus_per_node=8", "slurm.partition=gpu", "slurm.time=12:00:00", "slurm.mem=0"],
    # 4 nodes x 8 GPUs with an account, setup lines and a network interface for NCCL.
    "multi_node_4x8": [
        "model=cerebras_gpt_111m",
        "run_name=gpt111m",
        "slurm.nodes=4",
        "slurm.gpus_per_node=8",
        "slurm.time=1-00:00:00",
        "slurm.partition=gpu",
        "slurm.account=proj42",
        "slurm.signal_seconds=600",
        "slurm.setup=[module load cuda/12.4,source /srv/venv/bin/activate]",
        "+slurm.env.NCCL_SOCKET_IFNAME=ib0",
        "slurm.extra_sbatch=[--exclusive]",
    ],  # fmt: skip
    # What the SLURM tests submit: 2 CPU tasks, DDP over gloo.
    "cpu_2tasks": [
        "experiment=smoke",
        "strategy=ddp",
        "slurm.gpus_per_node=2",
        "slurm.cpus_per_task=1",
        "slurm.time=10",
        "slurm.signal_seconds=60",
    ],  # fmt: skip
}


def _submit_main():
    return load_script(REPO_ROOT / "slurm" / "submit.py").main


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_scripts_match_the_committed_ones(case: str, capsys: pytest.CaptureFixture) -> None:
    script = _submit_main()(["--dry-run", *COMMON, *CASES[case]])
    assert capsys.readouterr().out == script
    expected = EXPECTED / f"sbatch_{case}.sh"
    if os.environ.get("CGPT_UPDATE_EXPECTED"):
        expected.write_text(script)
    assert expected.is_file(), f"missing {expected}; run with CGPT_UPDATE_EXPECTED=1 to create it"
    assert script == expected.read_text(), (
        f"rendered script differs from {expected}; if intended, run CGPT_UPDATE_EXPECTED=1 pytest {__file__}"
    )


def test_rendered_script_has_one_task_per_device_signal_and_requeue() -> None:
    script = (EXPECTED / "sbatch_multi_node_4x8.sh").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@600", "#SBATCH --requeue", "#SBATCH --exclusive",
                 "export NCCL_SOCKET_IFNAME=ib0", "export MASTER_PORT=", "trainer.devices=8",
                 "trainer.num_nodes=4"):  # fmt: skip
        assert line in script, line
    cpu = (EXPECTED / "sbatch_cpu_2tasks.sh").read_text()
    assert "--gpus-per-node" not in cpu and "NCCL" not in cpu and "#SBATCH --ntasks-per-node=2" in cpu


def test_preflight_refuses_trainer_sbatch_mismatch(capsys: pytest.CaptureFixture) -> None:
    main = _submit_main()
    with pytest.raises(ConfigError, match="trainer.devices=4 but slurm.gpus_per_node=8"):
        main(["--dry-run", *COMMON, "slurm.gpus_per_node=8", "trainer.devices=4"])
    with pytest.raises(ConfigError, match="trainer.num_nodes=1 but slurm.nodes=2"):
        main(["--dry-run", *COMMON, "slurm.nodes=2", "trainer.num_nodes=1"])
    with pytest.raises(ConfigError, match="slurm.accelerator=cpu"):
        main(["--dry-run", *COMMON, "trainer.accelerator=cpu", "slurm.accelerator=gpu"])
    with pytest.raises(ConfigError, match="not divisible"):
        main(["--dry-run", *COMMON, "slurm.gpus_per_node=3", "data.global_batch_size=8", "data.micro_batch_size=2"])
    assert capsys.readouterr().out == ""  # nothing rendered for a refused config


def test_elastic_job_asks_for_a_node_range_and_passes_the_node_count_it_got(capsys: pytest.CaptureFixture) -> None:
    """slurm.min_nodes: --nodes=MIN-MAX, no --ntasks-per-node in the allocation (it would pin SLURM to
    MIN nodes), srun starts the tasks per node, and the job's trainer.num_nodes is the count it got."""
    main = _submit_main()
    script = main(["--dry-run", *COMMON, "slurm.nodes=4", "slurm.min_nodes=2", "slurm.gpus_per_node=8",
                   "slurm.cpus_per_task=4", "data.global_batch_size=192", "data.micro_batch_size=2"])  # fmt: skip
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2-4" in sbatch and "#SBATCH --cpus-per-task=32" in sbatch
    assert not any("--ntasks-per-node" in line for line in sbatch)
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=8 --cpus-per-task=4 \\" in script
    assert script.rstrip().endswith('trainer.num_nodes="$SLURM_JOB_NUM_NODES"') and "trainer.num_nodes=4" not in script
    # The global batch must divide over every node count the job may get.
    with pytest.raises(ConfigError, match="not divisible"):
        main(["--dry-run", *COMMON, "slurm.nodes=4", "slurm.min_nodes=3", "slurm.gpus_per_node=1",
              "data.global_batch_size=8", "data.micro_batch_size=1"])  # fmt: skip
    with pytest.raises(ConfigError, match="slurm.min_nodes=3 must be an integer from 1 to slurm.nodes=2"):
        SlurmConfig(nodes=2, min_nodes=3)
    assert not SlurmConfig(nodes=2, min_nodes=2).elastic and list(SlurmConfig(nodes=3, min_nodes=2).node_counts) == [
        2,
        3,
    ]
    capsys.readouterr()


def test_check_resources_and_environment() -> None:
    s = SlurmConfig(nodes=2, gpus_per_node=4)
    check_resources(s, 4, 2, "gpu")
    with pytest.raises(ConfigError, match="under SLURM give a number"):
        check_resources(s, "auto", 2, "gpu")
    env = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NAME": "cgpt"}
    check_environment(4, 2, env)
    with pytest.raises(ConfigError, match="runs 8 tasks but trainer.devices=1"):
        check_environment(1, 1, env)
    check_environment(1, 1, {"SLURM_JOB_NAME": "cgpt", "SLURM_NTASKS": "8"})  # the batch shell, not a step
    with pytest.raises(ConfigError, match="runs 1 tasks but trainer.devices=1 x trainer.num_nodes=2"):
        check_environment(1, 2, {**env, "SLURM_NTASKS": "1"})  # an elastic job restarted on fewer nodes
    check_environment(1, 1, {**env, "SLURM_JOB_NAME": "bash"})  # interactive allocation


def test_slurm_config_validation_and_times() -> None:
    assert parse_time("30") == 1800 and parse_time("1:30") == 90 and parse_time("2:00:00") == 7200
    assert parse_time("1-12") == 129600 and parse_time("1-00:00:30") == 86430
    with pytest.raises(ConfigError, match="not a SLURM time"):
        parse_time("2h")
    with pytest.raises(ConfigError, match="signal_seconds=600 must be"):
        SlurmConfig(time="5", signal_seconds=600)
    with pytest.raises(ConfigError, match="gpus_per_node must be a positive integer"):
        SlurmConfig(gpus_per_node=0)
    assert "--no-requeue" in render_sbatch(SlurmConfig(requeue=False), ["python", "x.py"])
    assert requeue_job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert requeue_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}) == "7_2"
    assert requeue_job_id({}) is None


@pytest.mark.slow
def test_sigterm_saves_checkpoint_at_step_boundary_and_the_rerun_continues(tiny_data_dir: Path, tmp_path: Path) -> None:
    """SIGTERM from outside mid-run (what SLURM sends on preemption): last.ckpt at the next step, exit
    code 3; the re-run resumes there and finishes with the same loss as an uninterrupted run. (USR1
    before a time limit: tests/test_slurm_cluster.py, on a real cluster.)"""
    import json
    import re
    import subprocess

    from conftest import REPO_ROOT, run_script

    args = ["train/pretrain.py", "experiment=smoke", f"data.dir={tiny_data_dir}", "data.micro_batch_size=2",
            "data.global_batch_size=2", "trainer.max_steps=8", "trainer.validate_every_steps=8",
            "callbacks.checkpoint.every_n_steps=100", "sample=null", "logger=none"]  # fmt: skip
    ref = tmp_path / "ref"
    run_script([*args, f"paths.output_dir={ref}"], timeout=240)

    out = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args, f"paths.output_dir={out}"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:  # the progress line of step 2 (smoke prints every 2 steps)
            lines.append(line)
            if line.startswith("step 2/8"):
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=240) == 3, "".join(lines)[-4000:]
    finally:
        proc.kill()
    log = "".join(lines)
    assert "received SIGTERM" in log, log[-3000:]
    saved = int(re.search(r"preempted: saved \S+ at step (\d+)", log).group(1))
    assert 2 <= saved < 8 and (out / "checkpoints" / "last.ckpt").is_file() and not (out / "summary.json").exists()
    resumed = run_script([*args, f"paths.output_dir={out}"], timeout=240)
    assert "resuming from" in resumed.stdout
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    assert b["steps"] == a["steps"] == 8 and b["steps_this_run"] == 8 - saved  # it continued where it stopped
    # Measured: identical (one process resumes bitwise), so equality is asserted.
    assert (b["train_loss"], b["val_loss"]) == (a["train_loss"], a["val_loss"])


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2", "SIGTERM"])
def test_every_default_preemption_signal_sets_the_flag_and_restores_the_old_handler(name: str) -> None:
    """conf/pretrain.yaml's preemption.signals: SLURM's USR1 before a time limit, submitit's USR2,
    SIGTERM on preemption. Each is caught (the run goes on to the next step boundary, not killed)."""
    import yaml

    from cgpt.preemption import PreemptionHandler

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "pretrain.yaml").read_text())
    assert name in conf["preemption"]["signals"]
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    handler = PreemptionHandler("/nonexistent", signals=conf["preemption"]["signals"])
    try:
        os.kill(os.getpid(), sig)  # delivered before os.kill returns (to the main thread)
        assert handler.received == sig and not handler.stopped  # remembered; saved at the next step
    finally:
        handler.restore()
    assert signal.getsignal(sig) is before


def test_dataloader_workers_leave_preemption_signals_to_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM signals every process of a step; a data worker that died on SIGTERM would make the main
    process fail instead of saving (seen with scancel --signal=TERM before workers ignored it)."""
    from cgpt.preemption import leave_signals_to_main_process

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    before = {sig: signal.getsignal(sig) for sig in signals}
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    try:
        leave_signals_to_main_process(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in signals)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _fake_run(max_steps: int = 4):
    from types import SimpleNamespace

    loop = SimpleNamespace(_should_accumulate=lambda: False)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, max_steps=max_steps, sanity_checking=False,
                              callback_metrics={}, fit_loop=loop)  # fmt: skip
    module = SimpleNamespace(model=None, model_config=SimpleNamespace(name="m", num_params=lambda: 2_000_000))
    return trainer, module


@pytest.mark.parametrize("bar", [False, True])
def test_progress_lines_in_log_files_and_bar_on_terminals(bar: bool, capsys: pytest.CaptureFixture) -> None:
    """SLURM log files (not a terminal) get plain periodic lines; a terminal gets one updating bar."""
    import torch

    from cgpt.callbacks import ProgressPrinter

    trainer, module = _fake_run()
    progress = ProgressPrinter(every=2, bar="auto" if not bar else True)
    progress.on_train_start(trainer, module)
    for step in range(1, 5):
        trainer.global_step = step
        trainer.callback_metrics = {"train/loss": torch.tensor(5.0 - step), "tokens_per_sec": 1234.0}
        progress.on_train_batch_end(trainer, module)
    trainer.callback_metrics["val/loss"] = torch.tensor(1.5)
    progress.on_validation_end(trainer, module)
    progress.teardown(trainer, module, "fit")
    out = capsys.readouterr().out
    assert "training m: 2.00M parameters, 4 steps" in out and "step 4: val loss 1.5000" in out
    if bar:
        assert "4/4" in out and "loss=1.0000" in out and "\r" in out and "step 2/4 |" not in out
    else:
        lines = [line for line in out.splitlines() if line.startswith("step ") and "|" in line]
        assert [line.split(" |")[0] for line in lines] == ["step 2/4", "step 4/4"] and "\r" not in out
        assert "loss 3.0000" in lines[0] and "1,234 tok/s" in lines[0] and "eta" in lines[0]
