"""muP coordinate check: plot activation and logit scales against width under SP and muP (PNG).

    python bench/mup_coord_check.py                                  # widths 64..1024, 5 steps
    python bench/mup_coord_check.py --widths 64 128 256 512 --steps 8 --out coord.png

Each width trains for a few AdamW steps on one fixed random batch with the same base lr
(eta_base 6e-3); the plot shows mean |x| of the embedding, each block output and the logits per
step. muP curves stay flat across widths; SP curves climb. A table of the last step is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cgpt.mup import coord_check, plot_coord_check
from cgpt.presets import MUP_BASE_LR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=MUP_BASE_LR)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/mup_coord_check.png")
    args = parser.parse_args(argv)

    kw = dict(widths=args.widths, steps=args.steps, lr=args.lr, n_layer=args.n_layer, seed=args.seed)
    results = [coord_check(mup=False, **kw), coord_check(mup=True, **kw)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_coord_check(results, str(out))
    names = list(results[0].sizes[args.widths[0]])
    print(f"mean |x| after {args.steps - 1} steps (lr {args.lr}), widths {args.widths}:")
    for res in results:
        for name in names:
            values = " ".join(f"{v:8.3f}" for v in res.final(name))
            label = "muP" if res.mup else "SP"
            print(f"  {label:3s} {name:9s} {values}   widest/narrowest {res.growth(name):6.2f}")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
