"""Experiment loggers. W&B never waits on a network it cannot reach: offline unless configured."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb_run_id"


def wandb_has_credentials() -> bool:
    """True when a W&B key is configured (WANDB_API_KEY, or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: WANDB_MODE if set, else ``online`` with credentials and ``offline`` without."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_has_credentials() else "offline"


def wandb_logger(
    project: str = "cgpt",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    group: str | None = None,
    tags: list[str] | None = None,
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` that keeps one W&B run per output folder.

    The run id is stored in ``<save_dir>/wandb_run_id``: a requeued or re-run job with the same
    output folder continues the same run instead of starting a new one.
    """
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            id_file.write_text(run_id + "\n")
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        mode=resolve_wandb_mode(mode),
        group=group,
        tags=list(tags or []),
        id=run_id,
        resume="allow",
        **kwargs,
    )
