"""The scaling law L(C) = (C / C0)^(-alpha) + L_inf: the published one, a fit, its table and plot.

The fit uses numpy only: a grid over L_inf with a linear regression in log space for each, then a
damped Gauss-Newton refinement of all three parameters. Compute C is counted in training FLOPs
(:mod:`cgpt.flops`, Cerebras-paper convention for the published points).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cgpt.presets import PUBLISHED_PILE_LOSS, PUBLISHED_TRAIN_FLOPS

# The published law L(C) = (C / 5.984e22)^(-0.0737) + 0.5066 (Pile test loss against FLOPs).
PUBLISHED_LAW = {"c0": 5.984e22, "alpha": 0.0737, "l_inf": 0.5066}


class FitError(ValueError):
    """The points cannot determine the requested fit; the message says what to change."""


def law_loss(compute: Any, c0: float, alpha: float, l_inf: float) -> Any:
    """L(C) = (C / c0)^(-alpha) + l_inf (works on floats and numpy arrays)."""
    return np.power(np.asarray(compute, dtype=float) / c0, -alpha) + l_inf


@dataclass
class PowerLawFit:
    """A fitted L(C) = (C / c0)^(-alpha) + l_inf and how well it fits."""

    c0: float
    alpha: float
    l_inf: float
    rms_residual: float
    max_rel_error: float
    n_points: int
    l_inf_fixed: bool = False

    def predict(self, compute: Any) -> Any:
        return law_loss(compute, self.c0, self.alpha, self.l_inf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        fixed = " (fixed)" if self.l_inf_fixed else ""
        return (
            f"L(C) = (C / {self.c0:.4g})^(-{self.alpha:.4g}) + {self.l_inf:.4g}{fixed}  "
            f"[{self.n_points} points, rms residual {self.rms_residual:.2e}, max rel. error {self.max_rel_error:.2%}]"
        )


def _loglinear(x: np.ndarray, y: np.ndarray, l_inf: float) -> tuple[float, float, float]:
    """For fixed l_inf: regress log(y - l_inf) on x = log C; return (alpha, log c0, SSE in y)."""
    z = np.log(y - l_inf)
    slope, intercept = np.polyfit(x, z, 1)
    alpha = -slope
    if alpha == 0:
        return 0.0, 0.0, float("inf")
    log_c0 = intercept / alpha
    pred = np.exp(-alpha * (x - log_c0)) + l_inf
    return float(alpha), float(log_c0), float(np.sum((pred - y) ** 2))


def fit_power_law(
    compute: Any, loss: Any, l_inf: float | None = None, grid: int = 2000, iterations: int = 200
) -> PowerLawFit:
    """Least-squares fit of L(C) = (C / c0)^(-alpha) + l_inf to (compute, loss) points.

    ``l_inf=None`` fits it in [0, min(loss)) (needs 3 or more points); a number holds it fixed
    (2 or more points).
    Robust start: a grid over l_inf in [0, min(loss)) with a log-space regression for each; then a
    damped Gauss-Newton (Levenberg-Marquardt) refinement of (log c0, alpha, l_inf) on the loss.
    """
    c = np.asarray(compute, dtype=float).ravel()
    y = np.asarray(loss, dtype=float).ravel()
    if c.shape != y.shape:
        raise FitError(f"compute and loss differ in length ({c.size} vs {y.size})")
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[ok], y[ok]
    if len(np.unique(c)) < 2:
        raise FitError(f"a power law needs at least 2 points at different compute; got {len(np.unique(c))}")
    if l_inf is None and len(c) < 3:
        raise FitError(
            f"{len(c)} points cannot determine 3 parameters (c0, alpha, l_inf): add points to the ladder "
            "or fix the irreducible loss, e.g. l_inf=0"
        )
    if l_inf is not None and not l_inf < y.min():
        raise FitError(f"fixed l_inf={l_inf} must be below the smallest loss {y.min():.4g}")
    x = np.log(c)
    fixed = l_inf is not None
    if fixed:
        alpha, log_c0, _ = _loglinear(x, y, float(l_inf))
        linf = float(l_inf)
    else:
        candidates = y.min() * (1 - np.geomspace(1, 1e-4, grid))  # dense near min(loss)
        best = min((_loglinear(x, y, li) + (li,) for li in candidates), key=lambda r: r[2])
        alpha, log_c0, _, linf = best

    def residual(theta: np.ndarray) -> np.ndarray:
        a, lc, li = theta
        return np.exp(-a * (x - lc)) + li - y

    theta = np.array([alpha, log_c0, linf])
    free = [0, 1] if fixed else [0, 1, 2]
    lam = 1e-3
    cost = float(np.sum(residual(theta) ** 2))
    for _ in range(iterations):
        a, lc, _li = theta
        e = np.exp(-a * (x - lc))
        jac = np.stack([-(x - lc) * e, a * e, np.ones_like(x)], axis=1)[:, free]
        r = residual(theta)
        h, g = jac.T @ jac, jac.T @ r
        improved = False
        for _ in range(20):
            step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
            trial = theta.copy()
            trial[free] += step
            if not fixed and not 0.0 <= trial[2] < y.min():  # an irreducible loss is >= 0
                lam *= 10
                continue
            new_cost = float(np.sum(residual(trial) ** 2))
            if new_cost < cost:
                theta, cost, lam, improved = trial, new_cost, max(lam / 10, 1e-12), True
                break
            lam *= 10
        if not improved or cost < 1e-30:
            break
    a, lc, li = theta
    pred = np.exp(-a * (x - lc)) + li
    return PowerLawFit(
        c0=float(math.exp(lc)),
        alpha=float(a),
        l_inf=float(li),
        rms_residual=float(np.sqrt(np.mean((pred - y) ** 2))),
        max_rel_error=float(np.max(np.abs(pred - y) / y)),
        n_points=int(len(y)),
        l_inf_fixed=fixed,
    )


def published_points() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The Cerebras-GPT SP family's (name, training FLOPs, Pile test loss), as published."""
    names = list(PUBLISHED_TRAIN_FLOPS)
    return (
        names,
        np.array([PUBLISHED_TRAIN_FLOPS[n] for n in names]),
        np.array([PUBLISHED_PILE_LOSS[n] for n in names]),
    )


def fit_table(names: list[str], compute: Any, loss: Any, fit: PowerLawFit) -> str:
    """A Markdown table of the points with the fitted loss and relative error."""
    rows = ["| run | compute (FLOPs) | loss | fit | error |", "|---|---|---|---|---|"]
    for name, c, y in zip(names, np.asarray(compute, float), np.asarray(loss, float)):
        p = float(fit.predict(c))
        rows.append(f"| {name} | {c:.3e} | {y:.4f} | {p:.4f} | {100 * (p - y) / y:+.2f}% |")
    return "\n".join(rows)


def plot_fit(
    path: str,
    names: list[str],
    compute: Any,
    loss: Any,
    fit: PowerLawFit,
    title: str = "loss against training compute",
    reference: dict[str, float] | None = None,
) -> None:
    """Save a PNG: the points, the fitted law and optionally a ``reference`` law (c0, alpha, l_inf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(compute, float)
    y = np.asarray(loss, float)
    grid = np.geomspace(c.min() / 3, c.max() * 3, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(c, y, color="C0", zorder=3, label="runs")
    for name, ci, yi in zip(names, c, y):
        ax.annotate(name, (ci, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot(grid, fit.predict(grid), color="C1", label=f"fit: (C/{fit.c0:.3g})^-{fit.alpha:.3g} + {fit.l_inf:.3g}")
    if reference:
        ax.plot(
            grid,
            law_loss(grid, **reference),
            "--",
            color="gray",
            label=f"published: (C/{reference['c0']:.3g})^-{reference['alpha']:.3g} + {reference['l_inf']:.3g}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # loss spans less than a decade:
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))  # label the minor ticks too
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
