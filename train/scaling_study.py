"""A compute-optimal scaling study end to end: train a ladder of models, fit L(C), plot it.

    python data/prepare.py --shard-size-mb 1          # once: the Shakespeare shards
    python train/scaling_study.py                     # the default CPU ladder (minutes)
    python train/scaling_study.py --fit-only          # refit / replot the runs already there
    python train/scaling_study.py --published         # fit and plot the paper's seven points

Each rung "n_layer:d_model:n_head" (d_ffn = 4 x d_model) trains for its compute-optimal budget,
tokens_per_param x parameters, with train/pretrain.py: one subprocess per rung (--launcher local),
or all rungs as one Hydra multirun (--launcher hydra; add --override hydra/launcher=... for SLURM).
Each rung lives in <out>/runs/<rung>; a finished rung is skipped and an interrupted one resumes. Then every
runs/*/summary.json is collected, training compute C is counted (FLOPs, Cerebras-paper convention
by default), L(C) = (C / C0)^(-alpha) + L_inf is fitted to the final validation losses and
<out>/scaling_fit.png, scaling_table.md and scaling_fit.json are written.

CPU note: the 50257-entry vocabulary dominates tiny models, so the default ladder counts
non-embedding parameters for the 20-tokens-per-parameter rule (Kaplan et al.'s N); pass
--count total for the paper's convention on real hardware. Fewer than 3 rungs cannot determine
L_inf: it is then held at --l-inf (default 0) and the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cgpt.config import ModelConfig  # noqa: E402
from cgpt.flops import FLOP_CONVENTIONS, training_flops  # noqa: E402
from cgpt.scaling_law import PUBLISHED_LAW, FitError, fit_power_law, fit_table, plot_fit, published_points  # noqa: E402

DEFAULT_LADDER = "1:16:1,1:24:2,2:32:2,2:48:3"


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


def _shared_overrides(args: argparse.Namespace) -> list[str]:
    """The train/pretrain.py overrides every rung takes, however it is launched."""
    return [
        f"data.dir={args.data}", f"data.global_batch_size={args.batch_size}",
        f"data.micro_batch_size={args.batch_size}", f"data.val_batches={args.val_batches}", "data.num_workers=0",
        f"optim.lr={args.lr}", "scheduler.decay=linear",
        f"trainer.accelerator={args.accelerator}", "logger=csv", "sample=null", "resume=auto", f"seed={args.seed}",
    ]  # fmt: skip


def _run_pretrain(overrides: list[str], args: argparse.Namespace, announce: str, failed: str, done: str) -> None:
    """Run train/pretrain.py with ``overrides`` then the user's ``--override``s, printing ``announce``
    and the command first and ``done`` with the time after; on failure exit with ``failed``, the
    return code and the tail of its output."""
    cmd = [sys.executable, str(REPO_ROOT / "train" / "pretrain.py"), *overrides, *args.override]
    print(f"{announce}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=not args.verbose, text=True)
    if proc.returncode != 0:
        tail = "" if args.verbose else f"\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        raise SystemExit(f"{failed} exited {proc.returncode}{tail}")
    print(f"{done} finished in {time.perf_counter() - t0:.0f} s", flush=True)


def train_rung(name: str, cfg: ModelConfig, budget: dict, args: argparse.Namespace, out: Path) -> Path:
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
        *_shared_overrides(args), f"scheduler.warmup_steps={budget['warmup']}",
        f"trainer.max_steps={budget['steps']}", f"trainer.validate_every_steps={budget['steps']}",
        f"callbacks.checkpoint.every_n_steps={max(50, budget['steps'])}",
        f"callbacks.progress.every={max(1, budget['steps'] // 4)}",
    ]  # fmt: skip
    announce = f"[{name}] {budget['steps']} steps, {budget['tokens']:.3g} tokens"
    _run_pretrain(overrides, args, announce, failed=f"[{name}] train/pretrain.py", done=f"[{name}]")
    return summary


def train_rungs_multirun(rungs: list[tuple[str, ModelConfig, dict]], args: argparse.Namespace, out: Path) -> None:
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
        f"hydra.sweep.dir={out / 'runs'}", "hydra.sweep.subdir=${rung.name}", *_shared_overrides(args),
        "scheduler.warmup_steps=${rung.warmup}", "trainer.max_steps=${rung.steps}",
        "trainer.validate_every_steps=${rung.steps}", "callbacks.checkpoint.every_n_steps=${rung.steps}",
        "callbacks.progress.every=${rung.progress}",
    ]  # fmt: skip
    _run_pretrain(overrides, args, f"Hydra multirun of {len(todo)} rungs", failed="the Hydra multirun", done="multirun")


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "scaling_study"), help="study folder")
    p.add_argument("--data", default=str(REPO_ROOT / "data" / "prepared" / "shakespeare"), help="prepared shards")
    p.add_argument("--ladder", default=DEFAULT_LADDER, help="comma-separated n_layer:d_model:n_head rungs")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="compute-optimal ratio (Chinchilla: 20)")
    p.add_argument("--count", choices=("non_embedding", "total"), default="non_embedding",
                   help="parameters the token budget counts (see the CPU note)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of every rung")
    p.add_argument("--val-batches", type=int, default=16, help="validation micro-batches per rung")
    p.add_argument("--launcher", choices=("local", "hydra"), default="local",
                   help="local: one train/pretrain.py run after another; hydra: one Hydra multirun")  # fmt: skip
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--flops", choices=FLOP_CONVENTIONS, default="cerebras", help="FLOP convention of C")
    p.add_argument("--l-inf", type=float, default=None, help="hold L_inf fixed instead of fitting it")
    p.add_argument("--fit-only", action="store_true", help="skip training; fit the runs already in --out")
    p.add_argument("--published", action="store_true", help="fit the paper's seven points instead")
    p.add_argument("--verbose", action="store_true", help="stream the training output")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every rung")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.published:
        names, compute, loss = published_points()
        return fit_and_report(
            names, compute, loss, out, args.l_inf, "Cerebras-GPT (published): Pile loss vs compute", PUBLISHED_LAW
        )
    if not args.fit_only:
        meta = Path(args.data) / "meta.json"
        if not meta.is_file():
            raise SystemExit(f"{meta} not found: run `python data/prepare.py --shard-size-mb 1` first (or pass --data)")
        seq_len = json.loads(meta.read_text())["seq_len"]
        rungs = []
        for n_layer, d_model, n_head in parse_ladder(args.ladder):
            cfg = rung_config(n_layer, d_model, n_head, seq_len)
            budget = rung_budget(cfg, args.tokens_per_param, args.count, args.batch_size, seq_len)
            rungs.append((f"L{n_layer}-d{d_model}", cfg, budget))
        if args.launcher == "hydra":
            train_rungs_multirun(rungs, args, out)
        else:
            for name, cfg, budget in rungs:
                train_rung(name, cfg, budget, args, out)
    points = collect(out, args.flops)
    if not points:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    result = fit_and_report(
        [p["run"] for p in points], [p["compute"] for p in points], [p["val_loss"] for p in points], out,
        args.l_inf, f"scaling study ({len(points)} runs, {args.flops} FLOPs)",
    )  # fmt: skip
    result["runs"] = points
    (out / "scaling_fit.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
