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
from pathlib import Path

from cgpt.flops import FLOP_CONVENTIONS
from cgpt.scaling_study import StudyConfig, run_study

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = StudyConfig(out=REPO_ROOT / "outputs" / "scaling_study")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULTS.out), help="study folder")
    p.add_argument("--data", default=str(REPO_ROOT / "data" / "prepared" / "shakespeare"), help="prepared shards")
    p.add_argument("--ladder", default=DEFAULTS.ladder, help="comma-separated n_layer:d_model:n_head rungs")
    p.add_argument(
        "--tokens-per-param",
        type=float,
        default=DEFAULTS.tokens_per_param,
        help="compute-optimal ratio (Chinchilla: 20)",
    )
    p.add_argument("--count", choices=("non_embedding", "total"), default=DEFAULTS.count,
                   help="parameters the token budget counts (see the CPU note)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak lr of every rung")
    p.add_argument("--val-batches", type=int, default=DEFAULTS.val_batches, help="validation micro-batches per rung")
    p.add_argument("--launcher", choices=("local", "hydra"), default=DEFAULTS.launcher,
                   help="local: one train/pretrain.py run after another; hydra: one Hydra multirun")  # fmt: skip
    p.add_argument("--accelerator", default=DEFAULTS.accelerator)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--flops", choices=FLOP_CONVENTIONS, default=DEFAULTS.flops, help="FLOP convention of C")
    p.add_argument("--l-inf", type=float, default=DEFAULTS.l_inf, help="hold L_inf fixed instead of fitting it")
    p.add_argument("--fit-only", action="store_true", help="skip training; fit the runs already in --out")
    p.add_argument("--published", action="store_true", help="fit the paper's seven points instead")
    p.add_argument("--verbose", action="store_true", help="stream the training output")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every rung")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run_study(StudyConfig(**vars(parse_args(argv))))


if __name__ == "__main__":
    main()
