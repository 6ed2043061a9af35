"""Plan a compute-optimal Cerebras-GPT run: tokens, FLOPs, steps, batch, warmup, memory, wall time.

    python train/plan.py model=cerebras_gpt_1.3b gpus=64 gpu=H100_SXM mfu=0.4
    python train/plan.py d_model=1024 n_layer=16 n_head=16 compute=1e20 gpus=8 gpu=A100
    python train/plan.py compare=true          # the seven published sizes against the paper's FLOPs

Arguments are key=value (Hydra-style, no Hydra needed; ``--key value`` works too):
  model               preset (cerebras_gpt_111m ... 13b, *_mup, tiny, demo); default cerebras_gpt_111m
  n_layer, d_model, n_head, d_ffn, block_size   a custom shape (without model=) or overrides of
                      the preset; a shape that is not a preset takes the recipe of the published
                      size nearest in parameters
  tokens | compute    budget in tokens or in FLOPs (Cerebras-paper convention); default: 20 tokens
                      per parameter (tokens_per_param=...)
  seq_len, batch_size, lr, warmup_tokens   recipe overrides (defaults: the preset's; warmup 375M tokens)
  gpus, gpu, mfu      wall time on gpus x gpu (a name from cgpt/hardware.py, or peak FLOP/s) at mfu
  micro_batch_size, activation_checkpointing   for the memory estimate (one line per conf/strategy)
  json=true           print the plan as JSON instead of text
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from cgpt.config import ConfigError, ModelConfig  # noqa: E402
from cgpt.flops import flops_per_token, published_tokens  # noqa: E402
from cgpt.planning import STRATEGIES, format_plan, plan_training  # noqa: E402
from cgpt.presets import PUBLISHED_TRAIN_FLOPS  # noqa: E402

INT_KEYS = {"n_layer", "d_model", "n_head", "d_ffn", "block_size", "seq_len", "batch_size", "gpus", "micro_batch_size"}
FLOAT_KEYS = {"tokens", "compute", "tokens_per_param", "lr", "warmup_tokens", "mfu"}
BOOL_KEYS = {"activation_checkpointing", "json", "compare"}
STR_KEYS = {"model", "gpu"}
SHAPE_KEYS = {"n_layer", "d_model", "n_head", "d_ffn", "block_size"}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` (or ``--key value`` / ``--key=value``) arguments -> typed dict; unknown keys fail."""
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
            print(__doc__)
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


def conf_strategies() -> dict[str, dict[str, Any]]:
    """The strategy dicts of conf/strategy/*.yaml (except auto), or the built-in table."""
    found = {}
    for path in sorted((REPO_ROOT / "conf" / "strategy").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("name") not in (None, "auto"):
            found[path.stem] = data
    return found or STRATEGIES


def compare_published() -> str:
    """A table of the seven published sizes: our FLOPs against the paper's."""
    rows = ["| model | params | tokens | FLOPs (cgpt) | FLOPs (paper) | ratio |", "|---|---|---|---|---|---|"]
    for name, published in PUBLISHED_TRAIN_FLOPS.items():
        cfg = ModelConfig.from_name(name)
        tokens = published_tokens(name)
        flops = flops_per_token(cfg, 2048, "cerebras") * tokens
        rows.append(
            f"| {name} | {cfg.num_params() / 1e6:.0f}M | {tokens:.3g} | {flops:.3g} | {published:.2g} "
            f"| {flops / published:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
        plan = plan_training(cfg, strategies=conf_strategies(), **args)
    except ConfigError as e:
        raise SystemExit(f"plan.py: {e}") from None
    print(json.dumps(plan.to_dict(), indent=2) if as_json else format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
