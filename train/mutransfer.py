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
from pathlib import Path

from cgpt.mutransfer import MuTransferConfig, run_mutransfer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = MuTransferConfig(
    data=REPO_ROOT / "data" / "prepared" / "shakespeare", out=REPO_ROOT / "outputs" / "mutransfer"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULTS.data), help="prepared shards")
    p.add_argument("--out", default=str(DEFAULTS.out), help="output folder")
    p.add_argument("--widths", type=int, nargs="+", default=DEFAULTS.widths, help="d_model values")
    p.add_argument("--lrs", type=float, nargs="+", default=DEFAULTS.lrs, help="peak lrs")
    p.add_argument("--param", nargs="+", choices=("sp", "mup"), default=DEFAULTS.param)
    p.add_argument(
        "--base-width", type=int, default=DEFAULTS.base_width, help="muP base (proxy) width: m_w = width / base"
    )
    p.add_argument("--n-layer", type=int, default=DEFAULTS.n_layer)
    p.add_argument("--head-dim", type=int, default=DEFAULTS.head_dim, help="d_head (n_head = width / d_head)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--vocab", type=int, default=DEFAULTS.vocab, help="keep this many most frequent token ids")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run_mutransfer(MuTransferConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    main()
