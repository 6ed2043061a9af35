"""A compute-optimal scaling study: train a ladder of models, collect their losses, fit L(C), plot it.

Each rung "n_layer:d_model:n_head" (d_ffn = 4 x d_model) trains for its compute-optimal budget,
tokens_per_param x parameters, with train/pretrain.py: one subprocess per rung (``launcher="local"``)
or all rungs as one Hydra multirun (``launcher="hydra"``). :func:`run_study` does it all;
train/scaling_study.py is its command line (see there for the options and the CPU note).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cgpt.config import ModelConfig
from cgpt.flops import training_flops
from cgpt.scaling_law import PUBLISHED_LAW, FitError, fit_power_law, fit_table, plot_fit, published_points

REPO_ROOT = Path(__file__).resolve().parents[1]  # train/pretrain.py runs from the checkout

DEFAULT_LADDER = "1:16:1,1:24:2,2:32:2,2:48:3"


@dataclass
class StudyConfig:
    """A study's settings (the options of train/scaling_study.py, same names).

    Fields:
        out: study folder (runs/<rung>, the fit, its table and plot).
        data: prepared shards (not needed with ``fit_only`` or ``published``).
        ladder: comma-separated n_layer:d_model:n_head rungs.
        tokens_per_param: compute-optimal ratio (Chinchilla: 20).
        count: parameters the token budget counts, ``non_embedding`` or ``total``.
        batch_size: sequences per step.
        lr: peak lr of every rung.
        val_batches: validation micro-batches per rung.
        launcher: ``local`` (one train/pretrain.py run after another) or ``hydra`` (one multirun).
        accelerator: Lightning accelerator of every rung.
        seed: seed of every rung.
        flops: FLOP convention of C (:data:`cgpt.flops.FLOP_CONVENTIONS`).
        l_inf: hold L_inf fixed instead of fitting it.
        fit_only: skip training; fit the runs already in ``out``.
        published: fit the paper's seven points instead.
        verbose: stream the training output.
        override: extra Hydra overrides for every rung.
    """

    out: str | os.PathLike
    data: str | os.PathLike | None = None
    ladder: str = DEFAULT_LADDER
    tokens_per_param: float = 20.0
    count: str = "non_embedding"
    batch_size: int = 16
    lr: float = 2e-3
    val_batches: int = 16
    launcher: str = "local"
    accelerator: str = "cpu"
    seed: int = 1234
    flops: str = "cerebras"
    l_inf: float | None = None
    fit_only: bool = False
    published: bool = False
    verbose: bool = False
    override: list[str] = field(default_factory=list)


def parse_ladder(text: str) -> list[tuple[int, int, int]]:
    """``"1:16:1,2:32:2"`` -> [(n_layer, d_model, n_head), ...], validated."""
    rungs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            n_layer, d_model, n_head = (int(p) for p in parts)
        except ValueError:
            raise SystemExit(f"--ladder item {item!r}: expected n_layer:d_model:n_head, e.g. 2:32:2") from None
        if min(n_layer, d_model, n_head) < 1 or d_model % n_head:
            raise SystemExit(f"--ladder item {item!r}: positive sizes with d_model divisible by n_head")
        rungs.append((n_layer, d_model, n_head))
    if not rungs:
        raise SystemExit("--ladder is empty")
    return rungs


def rung_config(n_layer: int, d_model: int, n_head: int, seq_len: int) -> ModelConfig:
    return ModelConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, d_ffn=4 * d_model, block_size=seq_len)


def rung_budget(cfg: ModelConfig, tokens_per_param: float, count: str, batch: int, seq_len: int) -> dict:
    """Tokens, steps and warmup of one rung."""
    params = cfg.num_params()
    if count != "total":
        params -= (cfg.vocab_size + cfg.block_size) * cfg.d_model
    tokens = tokens_per_param * params
    steps = max(2, math.ceil(tokens / (batch * seq_len)))
    return {"params_counted": params, "tokens": tokens, "steps": steps, "warmup": max(1, min(steps - 1, steps // 5))}


def _shared_overrides(study: StudyConfig) -> list[str]:
    """The train/pretrain.py overrides every rung takes, however it is launched."""
    return [
        f"data.dir={study.data}", f"data.global_batch_size={study.batch_size}",
        f"data.micro_batch_size={study.batch_size}", f"data.val_batches={study.val_batches}", "data.num_workers=0",
        f"optim.lr={study.lr}", "scheduler.decay=linear",
        f"trainer.accelerator={study.accelerator}", "logger=csv", "sample=null", "resume=auto", f"seed={study.seed}",
    ]  # fmt: skip


def _run_pretrain(overrides: list[str], study: StudyConfig, announce: str, failed: str, done: str) -> None:
    """Run train/pretrain.py with ``overrides`` then the user's ``--override``s, printing ``announce``
    and the command first and ``done`` with the time after; on failure exit with ``failed``, the
    return code and the tail of its output."""
    cmd = [sys.executable, str(REPO_ROOT / "train" / "pretrain.py"), *overrides, *study.override]
    print(f"{announce}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=not study.verbose, text=True)
    if proc.returncode != 0:
        tail = "" if study.verbose else f"\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        raise SystemExit(f"{failed} exited {proc.returncode}{tail}")
    print(f"{done} finished in {time.perf_counter() - t0:.0f} s", flush=True)


def train_rung(name: str, cfg: ModelConfig, budget: dict, study: StudyConfig, out: Path) -> Path:
    """Train one rung with train/pretrain.py unless its summary.json shows it finished."""
    run_dir = out / "runs" / name
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("steps") == budget["steps"]:
        print(f"[{name}] done already ({summary})", flush=True)
        return summary
    overrides = [
        "model=cerebras_gpt_tiny", f"model.n_layer={cfg.n_layer}", f"model.d_model={cfg.d_model}",
        f"model.n_head={cfg.n_head}", f"model.d_ffn={cfg.d_ffn}", f"model.block_size={cfg.block_size}",
        f"run_name=scaling-{name}", f"paths.output_dir={run_dir}", f"hydra.run.dir={run_dir}",
        *_shared_overrides(study), f"scheduler.warmup_steps={budget['warmup']}",
        f"trainer.max_steps={budget['steps']}", f"trainer.validate_every_steps={budget['steps']}",
        f"callbacks.checkpoint.every_n_steps={max(50, budget['steps'])}",
        f"callbacks.progress.every={max(1, budget['steps'] // 4)}",
    ]  # fmt: skip
    announce = f"[{name}] {budget['steps']} steps, {budget['tokens']:.3g} tokens"
    _run_pretrain(overrides, study, announce, failed=f"[{name}] train/pretrain.py", done=f"[{name}]")
    return summary


def train_rungs_multirun(rungs: list[tuple[str, ModelConfig, dict]], study: StudyConfig, out: Path) -> None:
    """Train the unfinished rungs as one Hydra multirun of train/pretrain.py (one job per rung).

    Each rung's shape and budget travel as one swept dict, ``+rung=choice({...}, ...)``, that the
    model, scheduler and trainer keys interpolate; add e.g. ``--override hydra/launcher=submitit_slurm``
    to run the rungs as SLURM jobs.
    """
    todo = []
    for name, cfg, budget in rungs:
        summary = out / "runs" / name / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("steps") == budget["steps"]:
            print(f"[{name}] done already ({summary})", flush=True)
            continue
        fields = {"name": name, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
                  "d_ffn": cfg.d_ffn, "steps": budget["steps"], "warmup": budget["warmup"],
                  "progress": max(1, budget["steps"] // 4)}  # fmt: skip
        todo.append("{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}")
    if not todo:
        return
    overrides = [
        "-m", "model=cerebras_gpt_tiny", f"+rung=choice({','.join(todo)})", "model.n_layer=${rung.n_layer}",
        "model.d_model=${rung.d_model}", "model.n_head=${rung.n_head}", "model.d_ffn=${rung.d_ffn}",
        f"model.block_size={rungs[0][1].block_size}", "run_name=scaling-${rung.name}",
        f"hydra.sweep.dir={out / 'runs'}", "hydra.sweep.subdir=${rung.name}", *_shared_overrides(study),
        "scheduler.warmup_steps=${rung.warmup}", "trainer.max_steps=${rung.steps}",
        "trainer.validate_every_steps=${rung.steps}", "callbacks.checkpoint.every_n_steps=${rung.steps}",
        "callbacks.progress.every=${rung.progress}",
    ]  # fmt: skip
    announce = f"Hydra multirun of {len(todo)} rungs"
    _run_pretrain(overrides, study, announce, failed="the Hydra multirun", done="multirun")


def collect(out: Path, convention: str) -> list[dict]:
    """One point per runs/*/summary.json: name, params, tokens, compute, val loss."""
    points = []
    for summary in sorted((out / "runs").glob("*/summary.json")):
        s = json.loads(summary.read_text())
        model = {k: v for k, v in s["config"]["model"].items() if k in ModelConfig.__dataclass_fields__}
        cfg = ModelConfig.from_dict(model)
        seq_len = s["config"].get("resolved", {}).get("seq_len") or cfg.block_size
        if s.get("val_loss") is None:
            print(f"skipping {summary}: no validation loss", file=sys.stderr)
            continue
        points.append({
            "run": summary.parent.name, "params": cfg.num_params(), "tokens": s["tokens_seen"],
            "compute": training_flops(cfg, s["tokens_seen"], seq_len, convention), "val_loss": s["val_loss"],
            "wall_time_sec": s.get("wall_time_sec"),
        })  # fmt: skip
    return sorted(points, key=lambda p: p["compute"])


def fit_and_report(names, compute, loss, out: Path, l_inf: float | None, title: str, reference=None) -> dict:
    """Fit (holding L_inf when fewer than 3 points), write PNG + Markdown table + JSON, print."""
    fixed = l_inf
    if fixed is None and len(names) < 3:
        fixed = 0.0
        print(f"note: {len(names)} points cannot determine L_inf; holding it at 0 (add rungs or pass --l-inf)")
    try:
        fit = fit_power_law(compute, loss, l_inf=fixed)
    except FitError as e:
        raise SystemExit(f"cannot fit: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    table = fit_table(names, compute, loss, fit)
    plot_fit(str(out / "scaling_fit.png"), names, compute, loss, fit, title=title, reference=reference)
    (out / "scaling_table.md").write_text(f"{fit}\n\n{table}\n")
    result = {
        "fit": fit.to_dict(),
        "points": [{"run": n, "compute": float(c), "loss": float(y)} for n, c, y in zip(names, compute, loss)],
    }
    (out / "scaling_fit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{fit}\n\n{table}\n\nplot: {out / 'scaling_fit.png'}\ntable: {out / 'scaling_table.md'}")
    return result


def run_study(study: StudyConfig) -> dict:
    """Train the ladder (unless ``fit_only`` or ``published``), fit, write and return the result."""
    out = Path(study.out)
    if study.published:
        names, compute, loss = published_points()
        return fit_and_report(
            names, compute, loss, out, study.l_inf, "Cerebras-GPT (published): Pile loss vs compute", PUBLISHED_LAW
        )
    if not study.fit_only:
        if study.data is None:
            raise SystemExit("no data folder given: pass --data (or --fit-only / --published)")
        meta = Path(study.data) / "meta.json"
        if not meta.is_file():
            raise SystemExit(f"{meta} not found: run `python data/prepare.py --shard-size-mb 1` first (or pass --data)")
        seq_len = json.loads(meta.read_text())["seq_len"]
        rungs = []
        for n_layer, d_model, n_head in parse_ladder(study.ladder):
            cfg = rung_config(n_layer, d_model, n_head, seq_len)
            budget = rung_budget(cfg, study.tokens_per_param, study.count, study.batch_size, seq_len)
            rungs.append((f"L{n_layer}-d{d_model}", cfg, budget))
        if study.launcher == "hydra":
            train_rungs_multirun(rungs, study, out)
        else:
            for name, cfg, budget in rungs:
                train_rung(name, cfg, budget, study, out)
    points = collect(out, study.flops)
    if not points:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    result = fit_and_report(
        [p["run"] for p in points], [p["compute"] for p in points], [p["val_loss"] for p in points], out,
        study.l_inf, f"scaling study ({len(points)} runs, {study.flops} FLOPs)",
    )  # fmt: skip
    result["runs"] = points
    (out / "scaling_fit.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
