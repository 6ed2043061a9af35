"""A sweep folder as one table sorted by validation loss (the logic of train/collect.py).

Every ``summary.json`` below the folder is one row (a point of a Hydra multirun, a submitit job, or
any run); the overrides that differ between points (from each point's ``hydra/overrides.yaml``)
become columns.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

METRICS = ("val_loss", "val_ppl", "train_loss", "steps", "tokens_seen", "tokens_per_sec", "mfu", "wall_time_sec")


def _overrides(point: Path) -> dict[str, str]:
    """``key=value`` task overrides of a point, from Hydra's saved overrides.yaml (empty if none)."""
    for name in ("hydra", ".hydra"):
        f = point / name / "overrides.yaml"
        if f.is_file():
            items = yaml.safe_load(f.read_text()) or []
            return dict(o.split("=", 1) for o in items if "=" in o)
    return {}


def collect(sweep_dir: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows sorted by val_loss, missing values last) for every summary.json below ``sweep_dir``."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise SystemExit(f"collect.py: {root} is not a folder (give the sweep folder, e.g. multirun/NAME)")
    summaries = sorted(root.rglob("summary.json"))
    if not summaries:
        raise SystemExit(f"collect.py: no summary.json below {root}: did the sweep points finish?")
    points = []
    for path in summaries:
        summary = json.loads(path.read_text())
        points.append((path.parent, summary, _overrides(path.parent)))
    keys = sorted({k for _, _, o in points for k in o})
    varied = [k for k in keys if len({o.get(k) for _, _, o in points}) > 1]
    rows = []
    for folder, summary, overrides in points:
        row: dict[str, Any] = {"point": str(folder.relative_to(root)) or "."}
        row.update({k: overrides.get(k, "") for k in varied})
        row.update({m: summary.get(m) for m in METRICS})
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple[bool, float]:
        v = row["val_loss"]
        return (v is None or (isinstance(v, float) and math.isnan(v)), v if v is not None else 0.0)

    rows.sort(key=order)
    return ["point", *varied, *METRICS], rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    sweep_dir: str | os.PathLike, csv_path: str | os.PathLike | None = None, md_path: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Collect ``sweep_dir``, write the CSV and Markdown tables (default ``results.csv`` and
    ``results.md`` inside it), print the Markdown and return the rows."""
    columns, rows = collect(sweep_dir)
    csv_path = Path(csv_path or Path(sweep_dir) / "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md = to_markdown(columns, rows)
    Path(md_path or Path(sweep_dir) / "results.md").write_text(md)
    print(md, end="")
    print(f"\n{len(rows)} runs -> {csv_path}")
    return rows
