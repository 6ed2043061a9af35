"""Render the pretraining sbatch script from the Hydra config, check it, and submit it.

    python slurm/submit.py experiment=demo slurm.nodes=4 slurm.gpus_per_node=8 slurm.time=24:00:00 \
        slurm.partition=gpu [--dry-run]

Every argument except ``--dry-run`` is a Hydra override: ``slurm.*`` ones set the sbatch resources
(conf/slurm/default.yaml), all others are passed on to ``train/pretrain.py`` inside the job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from cgpt.config import ConfigError
from cgpt.preflight import plan_batch
from cgpt.slurm import SlurmConfig, check_resources, render_sbatch, submit

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))  # what ${paths.root_dir} resolves to, as in train/pretrain.py

TRAINER_KEYS = {"nodes": "num_nodes", "gpus_per_node": "devices"}


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(training overrides, slurm overrides); ``slurm=NAME`` selects a conf/slurm option."""
    train, slurm = [], []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        (slurm if key == "slurm" or key.startswith("slurm.") else train).append(o)
    return train, slurm


def compose_config(train: list[str], slurm: list[str]) -> DictConfig:
    """The pretraining config with a ``slurm`` node, paths resolved as in a job's Hydra run."""
    group = [o if o.startswith("+") else "+" + o for o in slurm if o.lstrip("+").startswith("slurm=")]
    keys = [o for o in slurm if not o.lstrip("+").startswith("slurm=")]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=train + (group or ["+slurm=default"]) + keys, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(cfg.hydra.run.dir)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.output_dir} resolves
    return cfg


def slurm_config(cfg: DictConfig, train: list[str]) -> tuple[SlurmConfig, list[str]]:
    """The SlurmConfig, and the trainer overrides that make the job's trainer match it."""
    values: dict[str, Any] = OmegaConf.to_container(cfg.slurm, resolve=True)
    values.pop("dry_run", None)
    given = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in train if "=" in o}
    extra = []
    for slurm_key, trainer_key in TRAINER_KEYS.items():
        if values[slurm_key] is None:
            values[slurm_key] = cfg.trainer[trainer_key]
        elif f"trainer.{trainer_key}" not in given:
            cfg.trainer[trainer_key] = values[slurm_key]
            extra.append(f"trainer.{trainer_key}={values[slurm_key]}")
    if "paths.output_dir" in given and "hydra.run.dir" not in given:  # keep Hydra's record with the run
        extra.append(f"hydra.run.dir={cfg.paths.output_dir}")
    if values["accelerator"] is None:
        values["accelerator"] = "cpu" if cfg.trainer.accelerator == "cpu" else "gpu"
    if values["python"] is None:
        values["python"] = sys.executable
    return SlurmConfig(**values), extra


def main(argv: list[str] | None = None) -> str:
    """Returns the rendered script (dry run) or the submitted job id."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (slurm.* for sbatch, others for training)")
    args = p.parse_args(argv)
    train, slurm_overrides = split_overrides(args.overrides)
    cfg = compose_config(train, slurm_overrides)
    slurm, extra = slurm_config(cfg, train)
    # Preflight: what would otherwise hang at init or fail after the job waited in the queue.
    check_resources(slurm, cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accelerator)
    if cfg.data.global_batch_size:  # (null: the preset's batch, checked when the job builds the model)
        for nodes in slurm.node_counts:  # an elastic job keeps its global batch on fewer nodes
            plan_batch(cfg.data.global_batch_size, cfg.data.micro_batch_size, slurm.gpus_per_node, nodes)
    command = [slurm.python, "train/pretrain.py", *train, *extra]
    if slurm.elastic:  # the job passes the node count it got (render_sbatch)
        command = [c for c in command if not c.lstrip("+").startswith("trainer.num_nodes=")]
    script = render_sbatch(slurm, command)
    if args.dry_run or cfg.slurm.dry_run:
        print(script, end="")
        return script
    log_dir = Path(slurm.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{slurm.job_name}.sbatch"
    path.write_text(script)
    job = submit(path)
    print(f"submitted job {job}: {path}\nlogs: {log_dir}/{slurm.job_name}-{job}.out\noutput: {cfg.paths.output_dir}")
    return job


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, RuntimeError) as e:
        raise SystemExit(f"submit.py: {e}") from None
