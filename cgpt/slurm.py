"""SLURM batch scripts for cgpt training: one typed config, a renderer, and the resource checks.

Hydra-free: ``slurm/submit.py`` composes the Hydra config, fills a :class:`SlurmConfig` and calls
:func:`render_sbatch`; tests render from the dataclass directly.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cgpt.config import ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "templates" / "pretrain.sbatch"

# What NCCL and torch.distributed need on GPU clusters; CPU (gloo) jobs get none of these.
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer raises instead of hanging the job
    "NCCL_DEBUG": "WARN",
}


@dataclass
class SlurmConfig:
    """sbatch resources and job environment. Field docs are repeated in conf/slurm/default.yaml."""

    job_name: str = "cgpt"
    nodes: int = 1
    # Fewest nodes the job may run on (sbatch --nodes=min_nodes-nodes): a job requeued after one of
    # its nodes failed restarts on the nodes left and resumes at the smaller world size (same global
    # batch, more gradient accumulation). None: exactly ``nodes``.
    min_nodes: int | None = None
    # Devices (GPUs, or CPU processes with accelerator=cpu) per node = tasks per node.
    gpus_per_node: int = 1
    # "gpu" requests --gpus-per-node and sets NCCL variables; "cpu" requests neither.
    accelerator: str = "gpu"
    cpus_per_task: int = 8
    # --mem per node ("0" = all of it); None leaves the partition default.
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # USR1 this many seconds before the time limit: the run checkpoints and requeues itself.
    signal_seconds: int = 300
    requeue: bool = True
    # Folder of the job logs (%x-%j.out); appended to across requeues.
    log_dir: str = "slurm-logs"
    # Folder the job runs in (the repository root).
    workdir: str = "."
    python: str = "python"
    # Shell lines run before srun (module load, source a venv, ...).
    setup: list[str] = field(default_factory=list)
    # Extra environment variables exported in the script.
    env: dict[str, str] = field(default_factory=dict)
    # Extra "#SBATCH" options, e.g. ["--exclusive"].
    extra_sbatch: list[str] = field(default_factory=list)
    # None: derived from the job id (10000 + id % 50000), so jobs sharing a node do not collide.
    master_port: int | None = None

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node", "cpus_per_task"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"slurm.{key} must be a positive integer, got {value!r}")
        if self.min_nodes is not None and not (isinstance(self.min_nodes, int) and 1 <= self.min_nodes <= self.nodes):
            raise ConfigError(
                f"slurm.min_nodes={self.min_nodes!r} must be an integer from 1 to slurm.nodes={self.nodes}"
            )
        if self.accelerator not in ("gpu", "cpu"):
            raise ConfigError(f"slurm.accelerator must be 'gpu' or 'cpu', got {self.accelerator!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.job_name):
            raise ConfigError(f"slurm.job_name {self.job_name!r}: use letters, digits, '_', '.', '-'")
        limit = parse_time(self.time)
        if self.signal_seconds < 0 or (self.requeue and self.signal_seconds >= limit):
            raise ConfigError(
                f"slurm.signal_seconds={self.signal_seconds} must be >= 0 and below slurm.time={self.time} "
                f"({limit} s), or the job is signalled before it starts training"
            )

    @property
    def ntasks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_counts(self) -> range:
        """Every node count the job may run on: ``min_nodes..nodes`` (only ``nodes`` when not elastic)."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def elastic(self) -> bool:
        """True when the job may start (or restart) on fewer than ``nodes`` nodes."""
        return self.min_nodes is not None and self.min_nodes < self.nodes


def parse_time(value: str | int) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in seconds."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"slurm.time={value!r} is not a SLURM time (e.g. 30, 4:00:00, 1-12:00:00)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM


def check_resources(slurm: SlurmConfig, devices: object, num_nodes: object, accelerator: str) -> None:
    """Refuse trainer settings that disagree with the sbatch resources (they hang at init otherwise)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
        raise ConfigError(
            f"trainer.devices={devices!r}: under SLURM give a number equal to slurm.gpus_per_node="
            f"{slurm.gpus_per_node} (one srun task per device)"
        )
    if devices != slurm.gpus_per_node:
        raise ConfigError(
            f"trainer.devices={devices} but slurm.gpus_per_node={slurm.gpus_per_node}: SLURM starts one "
            "task per device, so set both to the same number"
        )
    if num_nodes != slurm.nodes:
        raise ConfigError(f"trainer.num_nodes={num_nodes} but slurm.nodes={slurm.nodes}: set both to the same number")
    if accelerator == "cpu" and slurm.accelerator == "gpu":
        raise ConfigError("trainer.accelerator=cpu but slurm.accelerator=gpu: set slurm.accelerator=cpu")
    if accelerator in ("gpu", "cuda") and slurm.accelerator == "cpu":
        raise ConfigError(f"trainer.accelerator={accelerator} but slurm.accelerator=cpu requests no GPUs")


def check_environment(devices: object, num_nodes: object, environ: Mapping[str, str] | None = None) -> None:
    """Inside a SLURM job step: refuse a task layout that does not match the trainer (instead of a hang),
    and print where this task runs (``SLURM task 1/2 on node 1 (cgpt-n2)``), so the job log shows the layout.

    Does nothing outside ``srun`` (no SLURM_STEP_ID) or for single-task steps such as an interactive shell.
    """
    env = os.environ if environ is None else environ
    if "SLURM_STEP_ID" not in env or "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    ntasks = int(env["SLURM_NTASKS"])
    where = f"node {env.get('SLURM_NODEID', '?')} ({env.get('SLURMD_NODENAME', '?')})"
    print(f"SLURM task {env.get('SLURM_PROCID', '?')}/{ntasks} on {where}", flush=True)
    if ntasks == 1 and devices in (1, "auto") and num_nodes == 1:
        return
    if not isinstance(devices, int) or not isinstance(num_nodes, int) or ntasks != devices * num_nodes:
        raise ConfigError(
            f"this SLURM step runs {ntasks} tasks but trainer.devices={devices} x trainer.num_nodes={num_nodes}: "
            "set --ntasks-per-node to trainer.devices and --nodes to trainer.num_nodes (slurm/submit.py does)"
        )


def render_sbatch(slurm: SlurmConfig, command: Sequence[str]) -> str:
    """The batch script that runs ``command`` once per device under ``srun``.

    An elastic job (``min_nodes`` < ``nodes``) requests ``--nodes=MIN-MAX`` and one CPU block per node
    (``--ntasks-per-node`` would pin SLURM to MIN nodes); ``srun`` then starts the tasks per node, and
    ``trainer.num_nodes`` is appended to ``command`` as the node count the job actually got.
    """
    if slurm.elastic:
        sbatch = [
            f"--job-name={slurm.job_name}",
            f"--nodes={slurm.min_nodes}-{slurm.nodes}",
            f"--cpus-per-task={slurm.cpus_per_task * slurm.gpus_per_node}",
        ]
        srun = f"--ntasks-per-node={slurm.gpus_per_node} --cpus-per-task={slurm.cpus_per_task}"
    else:
        sbatch = [
            f"--job-name={slurm.job_name}",
            f"--nodes={slurm.nodes}",
            f"--ntasks-per-node={slurm.gpus_per_node}",
            f"--cpus-per-task={slurm.cpus_per_task}",
        ]
        srun = f"--cpus-per-task={slurm.cpus_per_task}"
    if slurm.accelerator == "gpu":
        sbatch.append(f"--gpus-per-node={slurm.gpus_per_node}")
    if slurm.mem is not None:
        sbatch.append(f"--mem={slurm.mem}")
    sbatch.append(f"--time={slurm.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            sbatch.append(f"--{key}={getattr(slurm, key)}")
    sbatch.append(f"--output={slurm.log_dir}/%x-%j.out")
    sbatch.append("--open-mode=append")
    if slurm.requeue:
        sbatch += [f"--signal=USR1@{slurm.signal_seconds}", "--requeue"]
    else:
        sbatch.append("--no-requeue")
    sbatch += list(slurm.extra_sbatch)

    env = {"OMP_NUM_THREADS": str(slurm.cpus_per_task)}
    if slurm.accelerator == "gpu":
        env.update(NCCL_ENV)
    env.update({k: str(v) for k, v in slurm.env.items()})
    port = str(slurm.master_port) if slurm.master_port else "$((10000 + SLURM_JOB_ID % 50000))"
    args = [shlex.join(command[:2]), *(shlex.quote(c) for c in command[2:])]
    if slurm.elastic:
        args.append('trainer.num_nodes="$SLURM_JOB_NUM_NODES"')

    return TEMPLATE.read_text().format(
        sbatch="\n".join(f"#SBATCH {line}" for line in sbatch),
        workdir=shlex.quote(slurm.workdir),
        log_dir=shlex.quote(slurm.log_dir),
        setup="\n".join(slurm.setup) if slurm.setup else "# (no setup lines)",
        env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        master_port=port,
        srun_options=srun,
        command=" \\\n    ".join(args),
    )


def submit(script: str | os.PathLike) -> str:
    """``sbatch SCRIPT``; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("sbatch not found: run on a SLURM login node (or start slurm/local_cluster.sh)") from e
    if out.returncode:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def requeue_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` needs for the current job (array tasks included), or None outside SLURM."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")
