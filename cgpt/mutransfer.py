"""muTransfer check: sweep the learning rate over several widths, under SP and under muP.

Every (parametrization, width, lr) point trains a fresh 2-layer Cerebras-GPT-shaped model for a
few steps from the same seed on the same batches and records the mean training loss of its last
10 steps. Under SP the best lr moves as the model widens; under muP it should stay put.
:func:`run_mutransfer` runs the grid and writes the plot, JSON and table; train/mutransfer.py is
its command line (see there for the details). The training loop is a plain in-process one (same
model, optimizer groups and schedule as train/pretrain.py) on a vocabulary cut to the most
frequent ids.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cgpt.config import ModelConfig
from cgpt.model import GPT
from cgpt.optim import OptimConfig, build_optimizer, build_scheduler


@dataclass
class MuTransferConfig:
    """The grid and its training (the options of train/mutransfer.py, same names).

    Fields:
        data: prepared shards.
        out: output folder (mutransfer.png, .json, .md).
        widths: d_model values.
        lrs: peak lrs.
        param: parametrizations, ``sp`` and/or ``mup``.
        base_width: muP base (proxy) width: m_w = width / base_width.
        n_layer: layers of every model.
        head_dim: d_head (n_head = width / head_dim).
        steps: training steps per point.
        batch_size: sequences per step.
        seq_len: positions per sequence.
        vocab: keep this many most frequent token ids (plus one "other" id).
        seed: seed of every point.
        threads: torch threads (``None``: torch's choice).
    """

    data: str | os.PathLike
    out: str | os.PathLike
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    lrs: list[float] = field(default_factory=lambda: [2**-k for k in range(12, 4, -1)])
    param: list[str] = field(default_factory=lambda: ["sp", "mup"])
    base_width: int = 64
    n_layer: int = 2
    head_dim: int = 32
    steps: int = 60
    batch_size: int = 16
    seq_len: int = 64
    vocab: int = 2048
    seed: int = 0
    threads: int | None = None


def load_tokens(data_dir: Path, n_samples: int, seq_len: int, vocab: int) -> torch.Tensor:
    """The first ``n_samples`` training sequences (cut to ``seq_len + 1``), ids remapped to the
    ``vocab`` most frequent (rank order) and ``vocab`` for every other id."""
    import webdataset as wds

    from cgpt.data.shards import DatasetMeta, iter_tar_samples

    meta = DatasetMeta.load(data_dir)
    if seq_len > meta.seq_len:
        raise SystemExit(f"--seq-len {seq_len} exceeds the data's {meta.seq_len}")
    rows: list[np.ndarray] = []
    for shard in meta.shards("train"):
        url = str(Path(data_dir) / shard["name"])
        with wds.gopen(url, "rb") as f:
            for sample in iter_tar_samples(f, url, meta.sample_len):
                # several (seq_len + 1)-windows per stored sample
                for start in range(0, meta.sample_len - seq_len, seq_len + 1):
                    rows.append(sample[start : start + seq_len + 1].astype(np.int64))
                if len(rows) >= n_samples:
                    break
        if len(rows) >= n_samples:
            break
    if len(rows) < n_samples:
        raise SystemExit(f"{data_dir}: only {len(rows)} sequences of {seq_len + 1} tokens, need {n_samples}")
    data = np.stack(rows[:n_samples])
    ids, counts = np.unique(data, return_counts=True)
    keep = ids[np.argsort(-counts)][:vocab]
    table = np.full(int(data.max()) + 1, vocab, dtype=np.int64)
    table[keep] = np.arange(len(keep))
    return torch.from_numpy(table[data])


def train_point(
    mup: bool, width: int, lr: float, tokens: torch.Tensor, settings: MuTransferConfig
) -> tuple[float, list[float]]:
    """Train one model; return (mean loss of the last 10 steps, loss curve). NaN if it diverged."""
    cfg = ModelConfig(
        n_layer=settings.n_layer, d_model=width, n_head=max(1, width // settings.head_dim), d_ffn=4 * width,
        vocab_size=settings.vocab + 1, block_size=settings.seq_len, mup=mup, mup_base_width=settings.base_width,
        name=f"{'mup' if mup else 'sp'}-d{width}",
    )  # fmt: skip
    torch.manual_seed(settings.seed)
    model = GPT(cfg)
    opt = build_optimizer(model, lr, OptimConfig(weight_decay=0.1, fused=False), 1e-8, cfg.width_mult)
    warmup = max(1, settings.steps // 10)
    sched = build_scheduler(opt, warmup, settings.steps, "linear", 0.1)
    losses = []
    for step in range(settings.steps):
        batch = tokens[step * settings.batch_size : (step + 1) * settings.batch_size]
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        if not torch.isfinite(loss):
            return float("nan"), losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-min(10, len(losses)) :]
    return float(np.mean(tail)), losses


def best_lrs(results: list[dict]) -> dict[str, dict[int, float]]:
    """{"sp"|"mup": {width: lr with the lowest final loss}} (diverged points ignored)."""
    best: dict[str, dict[int, tuple[float, float]]] = {}
    for r in results:
        if math.isnan(r["loss"]):
            continue
        cur = best.setdefault(r["param"], {}).get(r["width"])
        if cur is None or r["loss"] < cur[1]:
            best[r["param"]][r["width"]] = (r["lr"], r["loss"])
    return {p: {w: v[0] for w, v in sorted(d.items())} for p, d in best.items()}


def plot(results: list[dict], path: Path, widths: list[int]) -> None:
    """Loss against lr per width, one panel per parametrization, the best lr of each width starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in ("sp", "mup") if any(r["param"] == p for r in results)]
    fig, axes = plt.subplots(1, len(params), figsize=(5.2 * len(params), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, param in zip(axes[0], params):
        for i, w in enumerate(widths):
            pts = sorted((r["lr"], r["loss"]) for r in results if r["param"] == param and r["width"] == w)
            if not pts:
                continue
            lr, loss = zip(*pts)
            color = cmap(i / max(1, len(widths) - 1))
            ax.plot(lr, loss, "o-", color=color, label=f"width {w}")
            finite = [(x, y) for x, y in pts if not math.isnan(y)]
            if finite:
                bx, by = min(finite, key=lambda t: t[1])
                ax.plot([bx], [by], "*", color=color, markersize=14, markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate" + (" (base eta; hidden matrices use eta / m_w)" if param == "mup" else ""))
        ax.set_title("muP" if param == "mup" else "standard parametrization (SP)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (last 10 steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_mutransfer(settings: MuTransferConfig) -> dict:
    """Train every point of the grid; write mutransfer.png, .json and .md into ``out``; return the summary."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(settings.data) / "meta.json").is_file():
        raise SystemExit(f"{settings.data}/meta.json not found: run `python data/prepare.py --shard-size-mb 1` first")
    tokens = load_tokens(Path(settings.data), settings.steps * settings.batch_size, settings.seq_len, settings.vocab)
    results = []
    t_start = time.perf_counter()
    for param in settings.param:
        for width in settings.widths:
            for lr in sorted(settings.lrs):
                t0 = time.perf_counter()
                loss, curve = train_point(param == "mup", width, lr, tokens, settings)
                results.append({"param": param, "width": width, "lr": lr, "loss": loss, "curve": curve})
                print(f"{param:>3} width {width:>4} lr {lr:.2e}: loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)  # fmt: skip
    best = best_lrs(results)
    lines = ["| parametrization | " + " | ".join(f"width {w}" for w in settings.widths) + " |",
             "|---|" + "---|" * len(settings.widths)]  # fmt: skip
    for param, per_width in best.items():
        lines.append(
            f"| {param} | " + " | ".join(f"{per_width.get(w, float('nan')):.2e}" for w in settings.widths) + " |"
        )
    table = "\n".join(lines)
    plot(results, out / "mutransfer.png", settings.widths)
    summary = {
        "best_lr": {p: {str(w): v for w, v in d.items()} for p, d in best.items()},
        "results": results,
        "args": asdict(settings),
        "wall_time_sec": time.perf_counter() - t_start,
    }
    (out / "mutransfer.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "mutransfer.md").write_text(f"best lr per width\n\n{table}\n")
    print(f"\nbest lr per width:\n{table}\n\nplot: {out / 'mutransfer.png'}")
    return summary
