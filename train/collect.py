"""Collect a sweep folder into one table sorted by validation loss:

    python train/collect.py multirun/NAME [--csv FILE] [--md FILE]

Every ``summary.json`` below the folder is one row (a point of a Hydra multirun, a submitit job, or
any run); the overrides that differ between points (from each point's ``hydra/overrides.yaml``)
become columns. Writes ``results.csv`` and ``results.md`` into the folder and prints the Markdown.
"""

from __future__ import annotations

import argparse
from typing import Any

from cgpt.sweep_results import write_results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="sweep folder (hydra.sweep.dir), searched recursively for summary.json")
    p.add_argument("--csv", help="CSV path (default SWEEP_DIR/results.csv)")
    p.add_argument("--md", help="Markdown path (default SWEEP_DIR/results.md)")
    args = p.parse_args(argv)
    return write_results(args.sweep_dir, args.csv, args.md)


if __name__ == "__main__":
    main()
