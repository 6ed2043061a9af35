"""LoRA: low-rank adapters on chosen linears of a frozen :class:`~cgpt.model.GPT`.

A wrapped linear computes ``W x + b + (alpha / r) * B (A (dropout(x)))`` with ``A`` (r, in) and
``B`` (out, r). ``B`` starts at zero, so a freshly wrapped model computes exactly what the base did.
The wrapped layer *is* an ``nn.Linear`` that keeps its ``weight``/``bias`` under the same names, so
state-dict keys of the base stay GPT-2 names and the adapters add ``...lora_A`` / ``...lora_B``.

- :func:`apply_lora` wraps the targets and freezes everything else.
- :func:`adapter_state_dict` / :func:`save_adapters` / :func:`load_adapters`: the adapters alone
  (a small file holding the LoRA settings too).
- :func:`merge_lora` folds ``(alpha / r) B A`` into ``W`` and puts plain ``nn.Linear`` back: the
  result is an ordinary GPT (exportable to Hugging Face) with the same outputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Names a target may use: the linear's path inside a block, or a group.
TARGET_GROUPS = {
    "attention": ("attn.c_attn", "attn.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
LINEARS = TARGET_GROUPS["all"]
ADAPTER_FORMAT = "cgpt-lora-v1"


@dataclass
class LoRAConfig:
    """Low-rank adapter settings.

    Fields:
        rank: r, the inner dimension of each adapter (memory and capacity grow with it).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input during training.
        targets: linears to adapt: any of ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
            ``mlp.c_proj``, or the groups ``attention``, ``mlp``, ``all``.
        train_biases: also train the biases of the whole network (LayerNorm included) besides
            the adapters ("BitFit"-style); the base weight matrices stay frozen either way.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    train_biases: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = list(self.targets)
        self.linears()  # validates the names

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def linears(self) -> tuple[str, ...]:
        """The block-relative linear names the targets expand to."""
        out: list[str] = []
        for t in self.targets:
            names = TARGET_GROUPS.get(t, (t,) if t in LINEARS else None)
            if names is None:
                raise ValueError(f"unknown LoRA target {t!r}: use {list(LINEARS)} or {list(TARGET_GROUPS)}")
            out += [n for n in names if n not in out]
        if not out:
            raise ValueError("LoRAConfig.targets is empty: name at least one linear to adapt")
        return tuple(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        data = dict(data)
        data.pop("enabled", None)
        return cls(**data)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update; built from an existing linear by :meth:`wrap`."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.reset_adapter()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """A LoRA layer sharing ``linear``'s weight and bias tensors (no copy).

        Built without ``nn.Linear.__init__``, whose initialisation of a throwaway weight would draw
        from the generator wherever tensors are real (DeepSpeed ZeRO-3 ignores the meta device): the
        adapter's A is then the only draw, so every strategy gets the same adapters from one seed.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.rank, new.alpha, new.scale = rank, alpha, alpha / rank
        w = linear.weight
        new.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        new.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        new.reset_adapter()
        return new

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A as ``nn.Linear`` initialises its weight; B = 0, so a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.lora_dropout(x) @ self.lora_A.t()) @ self.lora_B.t()  # (..., in) -> (..., r) -> (..., out)
        return super().forward(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain linear whose weight is ``W + scale * B A`` (computed in fp32)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.detach().clone())
        return out


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every linear to wrap."""
    found = []
    for i, block in enumerate(model.transformer.h):
        for rel in config.linears():
            parent_name, attr = rel.split(".")
            found.append((getattr(block, parent_name), attr, f"transformer.h.{i}.{rel}"))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the target linears of ``model`` (a GPT) in place and freeze all else; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, name in _targets(model, config):
        linear = getattr(parent, attr)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        setattr(parent, attr, LoRALinear.wrap(linear, config.rank, config.alpha, config.dropout))
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name
        p.requires_grad_(is_adapter or (config.train_biases and name.endswith("bias")) or False)
        if config.train_biases and (".ln_" in name or "ln_f" in name):
            p.requires_grad_(True)
    model.lora_config = config
    return model


def reset_adapters(model: nn.Module) -> None:
    """Re-initialise every adapter in the order :func:`apply_lora` created them (so from the same
    RNG state they get the same values): used where the adapters were built on partitioned storage."""
    for parent, attr, _ in _targets(model, model.lora_config):
        getattr(parent, attr).reset_adapter()


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); the model becomes a plain GPT again."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable extras only: adapter matrices (and biases/LayerNorms when they were trained)."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    return {
        k: v.detach().cpu().clone()
        for k, v in model.named_parameters()
        if ".lora_" in k or (config is not None and config.train_biases and v.requires_grad)
    }


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters and their settings to ``path`` (a small torch file); returns the path."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": ADAPTER_FORMAT, "lora": asdict(config), "state_dict": adapter_state_dict(model)}, tmp)
    os.replace(tmp, path)
    return path


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the LoRA settings saved in ``path`` to a base GPT and load the adapter weights (strictly)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a cgpt LoRA adapter file (format {saved.get('format')!r})")
    if not has_lora(model):
        apply_lora(model, LoRAConfig(**saved["lora"]))
    params = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    state = saved["state_dict"]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    bad_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                 for k, v in state.items() if k in params and v.shape != params[k].shape]  # fmt: skip
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{path}: adapters do not fit the model (missing {missing}, unexpected {unexpected}, shapes {bad_shape}); "
            "was it trained on another base model or with other LoRA targets?"
        )
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model


def parameter_report(model: nn.Module, optimizer_bytes_per_param: int = 8) -> dict[str, float]:
    """Trainable vs total parameters and an estimate of training memory (weights + grads + AdamW).

    Memory counts every weight once in its dtype, plus a gradient (same dtype) and two fp32 AdamW
    moments per *trainable* parameter; activations are not included.
    """
    total = trainable = weight_bytes = trainable_bytes = base = base_bytes = 0
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        total += p.numel()
        weight_bytes += p.numel() * p.element_size()
        if ".lora_" not in name:
            base += p.numel()
            base_bytes += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
            trainable_bytes += p.numel() * p.element_size()
    state = trainable_bytes + trainable * optimizer_bytes_per_param
    full = 2 * base_bytes + base * optimizer_bytes_per_param  # every base weight trained, no adapters
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / max(total, 1),
        "weights_gb": weight_bytes / 1e9,
        "grads_and_optimizer_gb": state / 1e9,
        "full_finetune_gb": full / 1e9,  # weights + grads + AdamW of the base alone
    }


def format_report(report: dict[str, float]) -> str:
    r = report
    return (
        f"trainable parameters: {r['trainable_params'] / 1e6:.3f}M of {r['total_params'] / 1e6:.2f}M "
        f"({100 * r['trainable_fraction']:.2f}%); memory estimate: weights {r['weights_gb']:.3f} GB "
        f"+ grads/AdamW {r['grads_and_optimizer_gb']:.3f} GB (full fine-tune would need "
        f"{r['full_finetune_gb']:.3f} GB), activations excluded"
    )
