"""State dicts: the GPT's own tensor names, and strict copying into a model with a full report."""

from __future__ import annotations

import os

import torch
from torch import nn

# Prefixes that wrappers put in front of the GPT's own parameter names, in the order they nest.
WRAPPER_PREFIXES = (
    "_forward_module.",  # Lightning's wrapper around a DDP/DeepSpeed module
    "model.",  # the LightningModule's attribute
    "_orig_mod.",  # torch.compile
    "_checkpoint_wrapped_module.",  # torch's checkpoint_wrapper
)


class WeightMismatchError(ValueError):
    """The source's tensors do not match the model; the message lists each difference."""


def gpt_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GPT's own names for a state dict saved through any wrapper (Lightning, DDP, compile, ...).

    A checkpoint may leave the tied ``lm_head.weight`` out; it is filled from the token embedding.
    """
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        for prefix in WRAPPER_PREFIXES[2:]:  # compile / checkpoint wrappers can sit on inner modules too
            key = key.replace(prefix, "")
        out[key] = value
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike, skip_adapters: bool = False
) -> None:
    """Copy ``state`` into ``model``: every tensor accounted for and shaped alike, or a full error.

    ``skip_adapters``: the LoRA adapters of ``model`` are not expected in ``state`` (they start
    fresh) and are left as they are."""
    own = {k: v for k, v in model.state_dict().items() if not (skip_adapters and ".lora_" in k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: source {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source}: the weights do not match the model"]
        for title, items in (("missing from the source", missing), ("not in the model", unexpected),
                             ("shape mismatches", shapes)):  # fmt: skip
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        lines.append("  the architecture comes from the source; check that it is a cgpt/GPT-2 checkpoint of this model")
        raise WeightMismatchError("\n".join(lines))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k].to(dtype=t.dtype))
