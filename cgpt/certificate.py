"""The reproduction certificate: every preset, field by field, against the published configs.

:data:`cgpt.published.PUBLISHED` holds what Cerebras published (ModelZoo yamls, the paper);
:func:`cgpt_values` reads what a cgpt run of the preset uses, from the same code a run goes through
(:class:`~cgpt.config.ModelConfig`, :func:`~cgpt.optim.resolve_schedule`, :func:`~cgpt.optim.param_groups`,
the ``conf/`` defaults). :func:`certificate` pairs them up; ``python train/plan.py certificate=true``
prints the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgpt.config import ModelConfig, TrainingDefaults
from cgpt.optim import OptimConfig, SchedulerConfig, param_groups, resolve_schedule
from cgpt.published import (
    DISAGREEMENTS,
    PAPER_MUP_STDS,
    PAPER_MUP_TOLERANCE,
    PUBLISHED,
    PUBLISHED_CONTINUATIONS,
)

CONF = Path(__file__).resolve().parents[1] / "conf"  # the checkout's defaults, what a run composes
FLOAT_REL_TOL = 1e-12  # "exact": equal up to float rounding of the same expression


@dataclass(frozen=True)
class Row:
    """One field of one preset: the published value, cgpt's, and whether they agree."""

    preset: str
    field: str
    published: Any
    cgpt: Any
    source: str
    tolerance: float | None = None  # absolute; None: exact (floats to FLOAT_REL_TOL)

    @property
    def match(self) -> bool:
        a, b = self.published, self.cgpt
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            return len(a) == len(b) and all(_close(x, y, self.tolerance) for x, y in zip(a, b, strict=True))
        return _close(a, b, self.tolerance)


def _close(a: Any, b: Any, tolerance: float | None) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if tolerance is not None:
            return abs(a - b) <= tolerance
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=0.0)
    return a == b


def _conf(group: str, name: str) -> dict[str, Any]:
    """A ``conf/<group>/<name>.yaml`` file as a dict; empty where the checkout's conf/ is absent."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _hidden_lr_scale(config: ModelConfig) -> float:
    """The lr scale :func:`cgpt.optim.param_groups` gives a hidden matrix (QKV) of this width."""
    import torch

    from cgpt.model import GPT

    small = ModelConfig.from_dict({**config.to_dict(), "n_layer": 1, "vocab_size": 64, "block_size": 8})
    with torch.device("meta"):
        model = GPT(small)
    groups = param_groups(model, 0.1, small.width_mult)
    return next(g["lr_scale"] for g in groups if any(n.endswith("attn.c_attn.weight") for n in g["names"]))


def cgpt_values(preset: str) -> dict[str, Any]:
    """The value of every certified field that a cgpt run of ``preset`` (defaults only) uses."""
    from cgpt.model import INIT_TRUNCATION_STDS

    cfg, rec = ModelConfig.from_name(preset), TrainingDefaults.from_name(preset)
    optim = OptimConfig(**{k: v for k, v in _conf("optim", "adamw").items() if k in OptimConfig.__dataclass_fields__})
    sched_conf = SchedulerConfig(**_conf("scheduler", "default"))
    sched = resolve_schedule(sched_conf, rec, rec.max_steps)  # trainer.max_steps null: the preset's
    clip = _conf("trainer", "default").get("gradient_clip_val")
    values: dict[str, Any] = {
        "n_layer": cfg.n_layer,
        "d_model": cfg.d_model,
        "n_head": cfg.n_head,
        "d_ffn": cfg.d_ffn,
        "vocab_size": cfg.vocab_size,
        "block_size": cfg.block_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "embedding_init_std": cfg.embedding_init_std,
        "hidden_init_std": cfg.hidden_init_std,
        "output_init_std": cfg.residual_init_std,
        "init_truncation_stds": INIT_TRUNCATION_STDS,
        "adam_betas": tuple(optim.betas),
        "adam_eps": optim.eps if optim.eps is not None else rec.adam_eps,
        "weight_decay": optim.weight_decay,
        "peak_lr": optim.lr if optim.lr is not None else rec.lr,
        "warmup_steps": sched.warmup_steps,
        "decay": sched.decay,
        "decay_steps": sched.decay_steps,
        "end_lr": rec.lr * sched.final_lr_ratio,
        "max_steps": rec.max_steps,
        "batch_size": rec.batch_size,
        "max_gradient_norm": clip,
    }
    if cfg.mup:
        values |= {
            "mup_width_mult": cfg.width_mult,
            "embedding_multiplier": cfg.embedding_multiplier,
            "logits_multiplier": cfg.logits_multiplier,
            "attn_scale": cfg.attn_scale,
            "hidden_lr_scale": _hidden_lr_scale(cfg),
        }
    return values


def continuation_values(preset: str) -> dict[str, Any]:
    """What ``experiment=<preset>_phase2`` (``conf/experiment/``) runs: batch, schedule position at
    the resume, warmup, decay and where the schedule ends."""
    rec = TrainingDefaults.from_name(preset)
    exp = _conf("experiment", preset.replace("-", "_") + "_phase2")
    sched = SchedulerConfig(**exp.get("scheduler", {}))
    max_steps = exp.get("trainer", {}).get("max_steps")
    s = resolve_schedule(sched, rec, max_steps) if max_steps else None
    return {
        "batch_size": exp.get("data", {}).get("global_batch_size"),
        "resume_step": rec.max_steps,  # phase 1 ends at the preset's last step
        "schedule_step": rec.max_steps + sched.step_offset,
        "warmup_steps": s.warmup_steps if s else None,
        "decay": s.decay if s else None,
        "decay_steps": s.decay_steps if s else None,
        "schedule_end": max_steps + sched.step_offset if max_steps else None,
        "peak_lr": rec.lr,
        "end_lr": rec.lr * sched.final_lr_ratio,
        "adam_eps": rec.adam_eps,
    }


def certificate() -> list[Row]:
    """Every certified field of every published preset (and the 13B's phase 2), with the source."""
    rows: list[Row] = []
    for preset, published in PUBLISHED.items():
        ours = cgpt_values(preset)
        for field, value in published.items():
            if field != "source":
                rows.append(Row(preset, field, value, ours.get(field), published["source"]))
        if preset in PAPER_MUP_STDS:
            for field, value, tol in zip(
                ("hidden_init_std", "output_init_std"), PAPER_MUP_STDS[preset], PAPER_MUP_TOLERANCE, strict=True
            ):
                rows.append(Row(preset, field, value, ours[field], "paper (rounded)", tol))
    for preset, published in PUBLISHED_CONTINUATIONS.items():
        ours = continuation_values(preset)
        for field, value in published.items():
            if field != "source":
                rows.append(Row(f"{preset} phase 2", field, value, ours.get(field), published["source"]))
    return rows


def _show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.10g}"
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(v) for v in x) + ")"
    return str(x)


def format_certificate(rows: list[Row] | None = None) -> str:
    """The certificate as a markdown table, a summary line and the sources' disagreements."""
    rows = certificate() if rows is None else rows
    lines = ["| preset | field | published | cgpt | match | source |", "|---|---|---|---|---|---|"]
    for r in rows:
        tol = f" (+-{r.tolerance:g})" if r.tolerance is not None else ""
        mark = "yes" if r.match else "**NO**"
        lines.append(f"| {r.preset} | {r.field} | {_show(r.published)}{tol} | {_show(r.cgpt)} | {mark} | {r.source} |")
    presets = {r.preset for r in rows}
    bad = [r for r in rows if not r.match]
    lines.append("")
    lines.append(
        f"{len(rows) - len(bad)} of {len(rows)} fields match over {len(presets)} presets"
        + (f"; MISMATCH: {', '.join(f'{r.preset} {r.field}' for r in bad)}" if bad else "")
    )
    lines.append("")
    lines.append("Where the sources disagree:")
    for what, sources, followed in DISAGREEMENTS:
        lines.append(f"- {what}: {sources}. cgpt follows {followed}.")
    return "\n".join(lines)
