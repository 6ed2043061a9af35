"""muTransfer check: sweep the learning rate over several widths, under SP and under muP.

    python data/prepare.py --shard-size-mb 1                   # once: the Shakespeare shards
    python train/mutransfer.py                                 # default grid, a few CPU minutes
    python train/mutransfer.py --widths 64 128 256 512 --lrs 1e-3 3e-3 1e-2 --steps 200

Every (parametrization, width, lr) point trains a fresh 2-layer Cerebras-GPT-shaped model for
--steps steps from the same seed on the same batches and records the mean training loss of its
last 10 steps. Under SP the best lr moves (down) as the model widens; under muP (base width
--base-width, hidden lr eta / m_w, output logits / m_w, embeddings x 10, attention 1/d_head, as
cgpt.model and cgpt.optim implement it) it should stay put. Writes mutransfer.png (loss vs lr per
width, one panel per parametrization), mutransfer.json and a table of the best lr per width.

To keep CPU runs short, the training loop is a plain in-process one (same model, optimizer groups
and schedule as train/pretrain.py), and tokens are remapped to the --vocab most frequent ids of
the corpus plus one "other" id: the lm head of the 50257-entry GPT-2 vocabulary would otherwise
dominate the cost of these narrow models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cgpt.config import ModelConfig  # noqa: E402
from cgpt.model import GPT  # noqa: E402
from cgpt.optim import OptimConfig, build_optimizer, build_scheduler  # noqa: E402


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
    mup: bool, width: int, lr: float, tokens: torch.Tensor, args: argparse.Namespace
) -> tuple[float, list[float]]:
    """Train one model; return (mean loss of the last 10 steps, loss curve). NaN if it diverged."""
    cfg = ModelConfig(
        n_layer=args.n_layer, d_model=width, n_head=max(1, width // args.head_dim), d_ffn=4 * width,
        vocab_size=args.vocab + 1, block_size=args.seq_len, mup=mup, mup_base_width=args.base_width,
        name=f"{'mup' if mup else 'sp'}-d{width}",
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    opt = build_optimizer(model, lr, OptimConfig(weight_decay=0.1, fused=False), 1e-8, cfg.width_mult)
    warmup = max(1, args.steps // 10)
    sched = build_scheduler(opt, warmup, args.steps, "linear", 0.1)
    losses = []
    for step in range(args.steps):
        batch = tokens[step * args.batch_size : (step + 1) * args.batch_size]
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO_ROOT / "data" / "prepared" / "shakespeare"), help="prepared shards")
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "mutransfer"), help="output folder")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256], help="d_model values")
    p.add_argument("--lrs", type=float, nargs="+", default=[2**-k for k in range(12, 4, -1)], help="peak lrs")
    p.add_argument("--param", nargs="+", choices=("sp", "mup"), default=["sp", "mup"])
    p.add_argument("--base-width", type=int, default=64, help="muP base (proxy) width: m_w = width / base")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32, help="d_head (n_head = width / d_head)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048, help="keep this many most frequent token ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "meta.json").is_file():
        raise SystemExit(f"{args.data}/meta.json not found: run `python data/prepare.py --shard-size-mb 1` first")
    tokens = load_tokens(Path(args.data), args.steps * args.batch_size, args.seq_len, args.vocab)
    results = []
    t_start = time.perf_counter()
    for param in args.param:
        for width in args.widths:
            for lr in sorted(args.lrs):
                t0 = time.perf_counter()
                loss, curve = train_point(param == "mup", width, lr, tokens, args)
                results.append({"param": param, "width": width, "lr": lr, "loss": loss, "curve": curve})
                print(f"{param:>3} width {width:>4} lr {lr:.2e}: loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)  # fmt: skip
    best = best_lrs(results)
    lines = ["| parametrization | " + " | ".join(f"width {w}" for w in args.widths) + " |",
             "|---|" + "---|" * len(args.widths)]  # fmt: skip
    for param, per_width in best.items():
        lines.append(f"| {param} | " + " | ".join(f"{per_width.get(w, float('nan')):.2e}" for w in args.widths) + " |")
    table = "\n".join(lines)
    plot(results, out / "mutransfer.png", args.widths)
    summary = {
        "best_lr": {p: {str(w): v for w, v in d.items()} for p, d in best.items()},
        "results": results,
        "args": dict(vars(args)),
        "wall_time_sec": time.perf_counter() - t_start,
    }
    (out / "mutransfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "mutransfer.md").write_text(f"best lr per width\n\n{table}\n")
    print(f"\nbest lr per width:\n{table}\n\nplot: {out / 'mutransfer.png'}")
    return summary


if __name__ == "__main__":
    main()
