"""Plan a compute-optimal run: tokens, steps, batch, warmup, memory per device, wall time.

For a model and a token or compute budget the planner picks the compute-optimal token count
(20 per parameter), steps, batch, warmup (about 375M tokens, as published), peak lr, memory per
device under each parallel strategy (:mod:`cgpt.memory`), and wall time on N GPUs at a given MFU.
FLOPs are counted by :mod:`cgpt.flops`; the predicted loss is the published law of
:mod:`cgpt.scaling_law`. The command line of ``train/plan.py`` (:func:`plan_cli`) lives here too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cgpt.config import ConfigError, ModelConfig, TrainingDefaults, normalize_preset_name
from cgpt.flops import (
    TOKENS_PER_PARAM,
    compute_optimal_tokens,
    flops_per_token,
    published_phases,
    published_tokens,
    training_flops,
)
from cgpt.presets import PRESETS, PUBLISHED_TRAIN_FLOPS
from cgpt.scaling_law import PUBLISHED_LAW, law_loss

WARMUP_TOKENS = 375e6  # every published Cerebras-GPT run warms up over about 375M tokens


# --- memory -----------------------------------------------------------------------------------
# The strategies of conf/strategy/ (the fields cgpt.memory reads), for planning without Hydra.
def strategy_configs() -> dict[str, dict[str, Any]]:
    """The strategy dict of every registered strategy but ``auto`` (:data:`cgpt.strategies.SPECS`),
    as ``conf/strategy/<name>.yaml`` sets it: the rows of the planner's memory table."""
    from cgpt.strategies.registry import SPECS  # imports Lightning: only when memory is planned

    return {name: spec.config() for name, spec in SPECS.items() if spec.kind != "auto"}


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
    ``config`` with AdamW under ``strategy`` (a conf/strategy dict, e.g. ``strategy_configs()["fsdp"]``),
    from :func:`cgpt.memory.estimate_memory`."""
    from cgpt.memory import estimate_memory  # imports torch: only when memory is planned

    if world_size < 1 or micro_batch_size < 1:
        raise ConfigError("world_size and micro_batch_size must be >= 1")
    t = seq_len or config.block_size
    strategy = {**strategy, "activation_checkpointing": activation_checkpointing}
    m = estimate_memory(config, strategy, precision, micro_batch_size, t, devices=world_size)
    states = m.params + m.grads + m.optimizer + m.buffers
    return {"states": states, "activations": m.activations, "total": m.device_total, "host": m.host_offload}


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
    # The published run of a preset, phase by phase (batch_size, steps, tokens, FLOPs "cerebras"):
    # one phase, or two for the 13B (57,000 steps at batch 720, then 78,223 at 1080).
    published_phases: list[dict[str, float]] = field(default_factory=list)

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
    if key in PRESETS and "tiny" not in key and "demo" not in key:
        plan.published_phases = [
            {**ph, "flops": training_flops(config, ph["tokens"], t, "cerebras")} for ph in published_phases(key)
        ]
    world = gpus or 1
    plan.memory = {
        name: memory_per_device(config, strategy, world, micro_batch_size, t, activation_checkpointing)
        for name, strategy in (strategies or strategy_configs()).items()
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
    if len(plan.published_phases) > 1:
        parts = [
            f"phase {i}: {ph['steps']:,.0f} steps x batch {ph['batch_size']:.0f} = {ph['tokens']:.3e} tokens, "
            f"{ph['flops']:.3e} FLOPs"
            for i, ph in enumerate(plan.published_phases, 1)
        ]
        total = sum(ph["flops"] for ph in plan.published_phases)
        tokens = sum(ph["tokens"] for ph in plan.published_phases)
        lines.append(f"published run    {parts[0]}")
        lines += [f"                 {p}" for p in parts[1:]]
        lines.append(
            f"                 together {tokens:.3e} tokens, {total:.3e} FLOPs"
            + (f" (published {plan.published_train_flops:.2e})" if plan.published_train_flops else "")
        )
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


# --- the command line (train/plan.py) ---------------------------------------------------------
INT_KEYS = {"n_layer", "d_model", "n_head", "d_ffn", "block_size", "seq_len", "batch_size", "gpus", "micro_batch_size"}
FLOAT_KEYS = {"tokens", "compute", "tokens_per_param", "lr", "warmup_tokens", "mfu"}
BOOL_KEYS = {"activation_checkpointing", "json", "compare", "certificate"}
STR_KEYS = {"model", "gpu"}
SHAPE_KEYS = {"n_layer", "d_model", "n_head", "d_ffn", "block_size"}


def parse_plan_args(argv: list[str], usage: str = "") -> dict[str, Any]:
    """``key=value`` (or ``--key value`` / ``--key=value``) arguments -> typed dict; unknown keys fail.
    ``-h`` / ``help`` prints ``usage`` and exits."""
    tokens: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            tokens.append(f"{a[2:]}={argv[i + 1]}")
            i += 2
            continue
        tokens.append(a.removeprefix("--"))
        i += 1
    args: dict[str, Any] = {}
    known = INT_KEYS | FLOAT_KEYS | BOOL_KEYS | STR_KEYS
    for tok in tokens:
        if tok in ("-h", "help"):
            print(usage)
            raise SystemExit(0)
        key, sep, value = tok.partition("=")
        key = key.replace("-", "_").removeprefix("model.")
        if not sep or key not in known:
            raise SystemExit(f"plan.py: cannot use {tok!r}; expected key=value with key in {sorted(known)}")
        try:
            if key in INT_KEYS:
                args[key] = int(float(value))
            elif key in FLOAT_KEYS:
                args[key] = float(value)
            elif key in BOOL_KEYS:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                args[key] = value.lower() in ("true", "1", "yes")
            else:
                args[key] = value
        except ValueError:
            raise SystemExit(f"plan.py: {key}={value!r} is not a valid {key} value") from None
    return args


def compare_published() -> str:
    """A table of the seven published sizes: our FLOPs against the paper's."""
    rows = ["| model | params | tokens | FLOPs (cgpt) | FLOPs (paper) | ratio |", "|---|---|---|---|---|---|"]
    for name, published in PUBLISHED_TRAIN_FLOPS.items():
        cfg = ModelConfig.from_name(name)
        tokens = published_tokens(name)
        flops = flops_per_token(cfg, 2048, "cerebras") * tokens
        phases = published_phases(name)
        if len(phases) > 1:  # the FLOPs of a run in phases are their sum
            name += " (" + " + ".join(f"{p['steps']:,.0f} x {p['batch_size']:.0f}" for p in phases) + " seqs)"
        rows.append(
            f"| {name} | {cfg.num_params() / 1e6:.0f}M | {tokens:.3g} | {flops:.3g} | {published:.2g} "
            f"| {flops / published:.3f} |"
        )
    return "\n".join(rows)


def plan_cli(argv: list[str], strategies: dict[str, dict[str, Any]] | None = None, usage: str = "") -> int:
    """Parse ``argv`` (see :func:`parse_plan_args`), plan and print the plan (text or JSON) or, with
    ``compare=true``, the published comparison. ``strategies`` defaults to :func:`strategy_configs`."""
    args = parse_plan_args(argv, usage)
    if args.pop("certificate", False):  # exit status 1 when a field does not match
        from cgpt.certificate import certificate, format_certificate

        rows = certificate()
        print(format_certificate(rows))
        return 0 if all(r.match for r in rows) else 1
    if args.pop("compare", False):
        print(compare_published())
        return 0
    as_json = args.pop("json", False)
    shape = {k: args.pop(k) for k in list(args) if k in SHAPE_KEYS}
    model = args.pop("model", None)
    try:
        if model is None and shape:  # a custom shape: its recipe comes from the nearest published size
            missing = {"n_layer", "d_model", "n_head"} - set(shape)
            if missing:
                raise ConfigError(f"a custom shape needs {sorted(missing)} too (or model=<preset> to start from)")
            cfg = ModelConfig(**shape, name="custom")
        else:
            cfg = ModelConfig.from_name(model or "cerebras_gpt_111m", **shape)
            if shape:
                cfg.name = f"{cfg.name}+" + ",".join(f"{k}={v}" for k, v in shape.items())
        plan = plan_training(cfg, strategies=strategies, **args)
    except ConfigError as e:
        raise SystemExit(f"plan.py: {e}") from None
    print(json.dumps(plan.to_dict(), indent=2) if as_json else format_plan(plan))
    return 0
