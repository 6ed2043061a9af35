"""Compute-optimal planning and scaling-law fits (pure functions, no torch).

Three parts:

* FLOP counting. Two conventions. ``"palm"`` is what MFU is measured against
  (:meth:`cgpt.config.ModelConfig.flops_per_token`: 6 x parameters without position embeddings plus
  12 x n_layer x d_model x seq_len for attention). ``"cerebras"`` reproduces the training FLOPs the
  Cerebras-GPT paper publishes (within 9% for all seven sizes): every weight matrix counted as a
  matmul, the tied embedding twice (input lookup and LM head, as Chinchilla's appendix F does),
  and attention scores plus the weighted sum over the full, unmasked window counted at
  24 x n_layer x d_model x seq_len per token. The paper does not spell out its convention; this one
  is the simplest that matches its table (see ``docs/notes/issue-7.md``).
* A planner: for a model and a token or compute budget, the compute-optimal token count
  (20 per parameter), steps, batch, warmup (about 375M tokens, as published), peak lr, memory per
  device under each parallel strategy (:mod:`cgpt.memory`), and wall time on N GPUs at a given MFU.
* A robust fit of L(C) = (C / C0)^(-alpha) + L_inf with numpy only: a grid over L_inf with a
  linear regression in log space for each, then a damped Gauss-Newton refinement of all three.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from cgpt.config import ConfigError, ModelConfig, TrainingDefaults, normalize_preset_name
from cgpt.presets import PRESETS, PUBLISHED_PILE_LOSS, PUBLISHED_TRAIN_FLOPS

TOKENS_PER_PARAM = 20.0
WARMUP_TOKENS = 375e6  # every published Cerebras-GPT run warms up over about 375M tokens
# The published law L(C) = (C / 5.984e22)^(-0.0737) + 0.5066 (Pile test loss against FLOPs).
PUBLISHED_LAW = {"c0": 5.984e22, "alpha": 0.0737, "l_inf": 0.5066}
FlopConvention = Literal["palm", "cerebras", "6nd"]
FLOP_CONVENTIONS = ("palm", "cerebras", "6nd")


# --- FLOPs ------------------------------------------------------------------------------------
def flops_per_token(config: ModelConfig, seq_len: int | None = None, convention: FlopConvention = "palm") -> float:
    """Training (forward + backward) FLOPs per token under ``convention`` (see module docstring)."""
    t = seq_len or config.block_size
    n_no_pos = config.num_params() - config.block_size * config.d_model
    if convention == "palm":
        return config.flops_per_token(t)
    if convention == "6nd":
        return 6.0 * config.num_params()
    if convention == "cerebras":
        lm_head = 6.0 * config.vocab_size * config.d_model  # the tied matrix used a second time
        return 6.0 * n_no_pos + lm_head + 24.0 * config.n_layer * config.d_model * t
    raise ConfigError(f"unknown FLOP convention {convention!r}; choose one of {FLOP_CONVENTIONS}")


def training_flops(
    config: ModelConfig, tokens: float, seq_len: int | None = None, convention: FlopConvention = "cerebras"
) -> float:
    """Total training FLOPs for ``tokens`` tokens."""
    return flops_per_token(config, seq_len, convention) * tokens


def published_tokens(preset: str) -> float:
    """Tokens the published run of ``preset`` trained on (batch x steps x 2048; 13B in two phases)."""
    key = normalize_preset_name(preset)
    if key == "cerebras-gpt-13b":  # 57k steps at batch 720, then 78k at batch 1080
        return (720 * 57_000 + 1080 * 78_000) * 2048.0
    t = TrainingDefaults.from_name(key)
    return float(t.batch_size * t.max_steps * ModelConfig.from_name(key).block_size)


def compute_optimal_tokens(config: ModelConfig, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Chinchilla's compute-optimal data size: ``tokens_per_param`` x parameters."""
    return tokens_per_param * config.num_params()


# --- memory -----------------------------------------------------------------------------------
# The strategies of conf/strategy/ (the fields cgpt.memory reads), for planning without Hydra.
STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {"name": "ddp"},
    "deepspeed_stage_1": {"name": "deepspeed", "stage": 1},
    "deepspeed_stage_2": {"name": "deepspeed", "stage": 2},
    "deepspeed_stage_2_offload": {"name": "deepspeed", "stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"name": "deepspeed", "stage": 3},
    "fsdp": {"name": "fsdp", "sharding": "full", "mixed_precision": True},
}


def memory_per_device(
    config: ModelConfig,
    strategy: dict[str, Any],
    world_size: int,
    micro_batch_size: int,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    precision: str = "bf16-mixed",
) -> dict[str, float]:
    """Estimated bytes per device ``{"states", "activations", "total", "host"}`` of training
    ``config`` with AdamW under ``strategy`` (a conf/strategy dict, e.g. ``STRATEGIES["fsdp"]``).

    Uses :func:`cgpt.memory.estimate_memory` where that module exists; otherwise a small estimate
    here: 16 bytes per parameter (fp32 weights, grads, two Adam moments) divided over the world as
    the strategy shards them, and 34 x seq x batch x d_model bytes of activations per layer.
    """
    if world_size < 1 or micro_batch_size < 1:
        raise ConfigError("world_size and micro_batch_size must be >= 1")
    t = seq_len or config.block_size
    strategy = {**strategy, "activation_checkpointing": activation_checkpointing}
    try:
        from cgpt.memory import estimate_memory
    except ImportError:
        estimate_memory = None
    if estimate_memory is not None:
        m = estimate_memory(config, strategy, precision, micro_batch_size, t, devices=world_size)
        states = m.params + m.grads + m.optimizer + m.buffers
        return {"states": states, "activations": m.activations, "total": m.device_total, "host": m.host_offload}
    p, w = config.num_params(), world_size
    name, stage = strategy.get("name", "ddp"), int(strategy.get("stage", 0))
    if name == "fsdp" or stage >= 3:
        states = 16.0 * p / w
    elif stage == 2:
        states = 4.0 * p + 12.0 * p / w
    elif stage == 1:
        states = 8.0 * p + 8.0 * p / w
    else:
        states = 16.0 * p
    b, d = micro_batch_size, config.d_model
    per_layer = 34.0 * t * b * d
    acts = (config.n_layer * 2.0 * t * b * d + per_layer) if activation_checkpointing else config.n_layer * per_layer
    acts += 10.0 * t * b * config.vocab_size  # bf16 logits, fp32 copy, its grad
    return {"states": states, "activations": acts, "total": states + acts, "host": 0.0}


# --- GPUs -------------------------------------------------------------------------------------
def gpu_peak_flops(gpu: str) -> float:
    """Dense bf16 peak FLOP/s of a GPU type from :data:`cgpt.hardware.GPU_BF16_PEAK_FLOPS`
    (e.g. ``H100``, ``H100_SXM``, ``A100``), or a number in FLOP/s given as text."""
    from cgpt.hardware import GPU_BF16_PEAK_FLOPS

    try:
        return float(gpu)
    except ValueError:
        pass
    wanted = gpu.replace("_", " ").replace("-", " ").strip().lower()
    for key, value in GPU_BF16_PEAK_FLOPS.items():
        if key.lower() == wanted:
            return value
    raise ConfigError(
        f"unknown GPU type {gpu!r}; known: {sorted(GPU_BF16_PEAK_FLOPS)} (spaces may be written as _), "
        "or give the peak bf16 FLOP/s as a number, e.g. gpu=989e12"
    )


# --- the planner ------------------------------------------------------------------------------
@dataclass
class TrainingPlan:
    """Everything :func:`plan_training` decides; printable with :func:`format_plan`."""

    model: str
    params: int
    non_embedding_params: int
    seq_len: int
    tokens: float
    tokens_per_param: float
    batch_size: int
    tokens_per_step: int
    steps: int
    warmup_steps: int
    lr: float
    decay: str
    recipe_from: str
    flops_per_token: float  # "palm" convention (what MFU is measured against)
    train_flops: float  # "cerebras" convention (comparable with the published table and law)
    train_flops_palm: float
    predicted_loss: float  # the published Pile law at train_flops (meaningful for the Pile only)
    gpus: int | None = None
    gpu: str | None = None
    mfu: float | None = None
    wall_time_s: float | None = None
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    published_train_flops: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nearest_preset(config: ModelConfig) -> str:
    """The published SP preset whose parameter count is closest (in log space) to ``config``'s."""
    published = [k for k in PUBLISHED_TRAIN_FLOPS]
    n = config.num_params()
    return min(published, key=lambda k: abs(math.log(ModelConfig.from_name(k).num_params() / n)))


def plan_training(
    config: ModelConfig,
    tokens: float | None = None,
    compute: float | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    seq_len: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup_tokens: float = WARMUP_TOKENS,
    max_warmup_fraction: float = 0.2,
    gpus: int | None = None,
    gpu: str = "H100",
    mfu: float = 0.4,
    micro_batch_size: int = 1,
    activation_checkpointing: bool = False,
    strategies: dict[str, dict[str, Any]] | None = None,
) -> TrainingPlan:
    """Plan a run of ``config``.

    Budget: ``tokens`` (fixed data), or ``compute`` (FLOPs, "cerebras" convention; tokens follow),
    or neither: ``tokens_per_param`` x parameters (compute-optimal, 20 by default).
    Recipe: batch, lr and decay from the model's preset, or for a custom shape (``name`` not a
    preset) from the published size nearest in parameter count. Warmup is
    ``warmup_tokens`` (capped at ``max_warmup_fraction`` of the steps for short runs).
    Wall time is tokens x "palm" FLOPs per token / (gpus x peak x mfu), i.e. at the MFU that
    cgpt's ThroughputMonitor reports.
    """
    if tokens is not None and compute is not None:
        raise ConfigError("give a token budget or a compute budget, not both")
    t = seq_len or config.block_size
    if tokens is None and compute is not None:
        tokens = compute / flops_per_token(config, t, "cerebras")
    if tokens is None:
        tokens = compute_optimal_tokens(config, tokens_per_param)
    if tokens <= 0:
        raise ConfigError(f"token budget must be > 0, got {tokens}")

    key = normalize_preset_name(config.name, strict=False)
    recipe_from = key if key in PRESETS else nearest_preset(config)
    recipe = TrainingDefaults.from_name(recipe_from)
    if config.mup and not recipe_from.endswith("-mup") and f"{recipe_from}-mup" in PRESETS:
        recipe = TrainingDefaults.from_name(f"{recipe_from}-mup")
    batch = batch_size or recipe.batch_size
    tokens_per_step = batch * t
    steps = max(1, math.ceil(tokens / tokens_per_step))
    warmup = min(round(warmup_tokens / tokens_per_step), max(1, int(max_warmup_fraction * steps)))

    flops_c = training_flops(config, tokens, t, "cerebras")
    plan = TrainingPlan(
        model=config.name,
        params=config.num_params(),
        non_embedding_params=config.num_params() - (config.vocab_size + config.block_size) * config.d_model,
        seq_len=t,
        tokens=float(tokens),
        tokens_per_param=tokens / config.num_params(),
        batch_size=batch,
        tokens_per_step=tokens_per_step,
        steps=steps,
        warmup_steps=max(1, warmup),
        lr=lr or recipe.lr,
        decay=recipe.decay,
        recipe_from=recipe_from,
        flops_per_token=flops_per_token(config, t, "palm"),
        train_flops=flops_c,
        train_flops_palm=training_flops(config, tokens, t, "palm"),
        predicted_loss=law_loss(flops_c, **PUBLISHED_LAW),
        micro_batch_size=micro_batch_size,
        activation_checkpointing=activation_checkpointing,
        published_train_flops=PUBLISHED_TRAIN_FLOPS.get(key),
    )
    world = gpus or 1
    plan.memory = {
        name: memory_per_device(config, strategy, world, micro_batch_size, t, activation_checkpointing)
        for name, strategy in (strategies or STRATEGIES).items()
    }
    if gpus:
        if not 0 < mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {mfu}")
        plan.gpus, plan.gpu, plan.mfu = gpus, gpu, mfu
        plan.wall_time_s = plan.train_flops_palm / (gpus * gpu_peak_flops(gpu) * mfu)
    return plan


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: TrainingPlan) -> str:
    """A human-readable report of ``plan``."""
    lines = [
        f"model            {plan.model}: {plan.params / 1e6:.1f}M parameters "
        f"({plan.non_embedding_params / 1e6:.1f}M without embeddings), context {plan.seq_len}",
        f"tokens           {plan.tokens:.3e} ({plan.tokens_per_param:.1f} per parameter)",
        f"batch            {plan.batch_size} sequences = {plan.tokens_per_step:,} tokens/step "
        f"(recipe of {plan.recipe_from})",
        f"steps            {plan.steps:,}, warmup {plan.warmup_steps:,} "
        f"({plan.warmup_steps * plan.tokens_per_step / 1e6:.0f}M tokens), {plan.decay} decay to 10%",
        f"peak lr          {plan.lr:g}",
        f"training FLOPs   {plan.train_flops:.3e} (Cerebras-paper convention)"
        + (
            f"; published {plan.published_train_flops:.2e} (ratio {plan.train_flops / plan.published_train_flops:.3f})"
            if plan.published_train_flops
            else ""
        ),
        f"                 {plan.train_flops_palm:.3e} (6N + attention, what MFU counts: "
        f"{plan.flops_per_token / 1e9:.3g} GFLOP/token)",
        f"Pile loss (law)  {plan.predicted_loss:.3f} predicted by the published scaling law",
    ]
    if plan.wall_time_s is not None:
        peak = gpu_peak_flops(plan.gpu or "H100")
        lines.append(
            f"wall time        {_duration(plan.wall_time_s)} on {plan.gpus} x {plan.gpu} "
            f"({_si(peak, 'FLOP/s')} bf16 peak) at {100 * (plan.mfu or 0):.0f}% MFU "
            f"({plan.wall_time_s * (plan.gpus or 1) / 3600:,.0f} GPU-hours)"
        )
    world = plan.gpus or 1
    ac = ", activation checkpointing" if plan.activation_checkpointing else ""
    lines.append(
        f"memory/device    estimate for {world} device(s), micro-batch {plan.micro_batch_size}{ac} "
        "(keep 10-20% headroom):"
    )
    width = max((len(n) for n in plan.memory), default=0)
    for name, m in plan.memory.items():
        host = f", {m['host'] / 2**30:.1f} GiB on the host" if m.get("host") else ""
        lines.append(
            f"  {name:<{width}} {m['total'] / 2**30:8.1f} GiB  (model states {m['states'] / 2**30:.1f}, "
            f"activations {m['activations'] / 2**30:.1f}{host})"
        )
    return "\n".join(lines)


# --- the scaling law --------------------------------------------------------------------------
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
