"""muP coordinate check: does the scale of activations and logits stay flat as the model widens?

The standard muP test (Yang et al. 2021, "Tensor Programs V", and the ``mup`` package's
``get_coord_data``): train models of increasing width for a few steps with the *same* base
hyperparameters and record the mean absolute value of every layer's output ("coordinate size").
Under muP the curves are flat across widths; under the standard parametrization (SP) they grow
with width, which is why SP hyperparameters do not transfer from a small proxy model.

The muP itself lives in :class:`cgpt.config.ModelConfig` (init stds, multipliers, attention scale)
and :func:`cgpt.optim.param_groups` (hidden-matrix learning rates eta / m_w); this module only
measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cgpt.config import ModelConfig
from cgpt.model import GPT
from cgpt.optim import OptimConfig, build_optimizer
from cgpt.presets import MUP_BASE_LR


@dataclass
class CoordCheckResult:
    """Coordinate sizes (mean |x|) recorded during a coordinate check.

    ``sizes[width][name]`` is a list with one value per training step (the forward pass *before*
    each optimizer step, so entry 0 is at init). Names: ``embedding`` (the scaled embedding sum),
    ``block{i}`` (each block's output), ``logits`` (after the muP multiplier).
    """

    mup: bool
    widths: list[int]
    steps: int
    sizes: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def final(self, name: str) -> list[float]:
        """The last recorded value of ``name`` at each width, in width order."""
        return [self.sizes[w][name][-1] for w in self.widths]

    def growth(self, name: str) -> float:
        """Ratio of the last-step coordinate size at the widest over the narrowest width."""
        values = self.final(name)
        return values[-1] / values[0]


def coord_check(
    widths: Sequence[int] = (64, 128, 256, 512),
    mup: bool = True,
    steps: int = 5,
    lr: float = MUP_BASE_LR,
    n_layer: int = 2,
    d_head: int = 16,
    vocab_size: int = 256,
    seq_len: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> CoordCheckResult:
    """Train each width for ``steps`` AdamW steps on one fixed random batch and record coordinate sizes.

    Every width uses the same base ``lr`` (the muP base lr by default), heads of ``d_head`` and
    ``d_ffn = 4 * width``; muP scales the hidden-matrix lrs by 1/m_w through
    :func:`cgpt.optim.build_optimizer`, SP does not. Deterministic for a given ``seed``.
    """
    result = CoordCheckResult(mup=mup, widths=list(widths), steps=steps)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
    for width in widths:
        if width % d_head:
            raise ValueError(f"coord_check width {width} is not a multiple of d_head={d_head}")
        config = ModelConfig(
            n_layer=n_layer,
            d_model=width,
            n_head=width // d_head,
            vocab_size=vocab_size,
            block_size=seq_len,
            mup=mup,
            name=f"coord-check-{width}",
        )
        torch.manual_seed(seed)
        model = GPT(config)
        optimizer = build_optimizer(model, lr, OptimConfig(weight_decay=0.0, fused=False), 1e-8, config.width_mult)
        result.sizes[width] = _train_and_record(model, optimizer, tokens, steps)
    return result


def _train_and_record(
    model: GPT, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, steps: int
) -> dict[str, list[float]]:
    sizes: dict[str, list[float]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        sizes.setdefault(name, []).append(x.detach().abs().mean().item())

    hooks = [
        block.register_forward_hook(lambda _m, _i, out, i=i: record(f"block{i}", out))
        for i, block in enumerate(model.transformer.h)
    ]
    # The first block's input is the (multiplied) embedding sum.
    hooks.append(model.transformer.h[0].register_forward_pre_hook(lambda _m, args: record("embedding", args[0])))
    try:
        model.train()
        for _ in range(steps):
            logits = model(tokens[:, :-1])
            record("logits", logits)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def plot_coord_check(results: Sequence[CoordCheckResult], path: str, names: Sequence[str] | None = None) -> None:
    """Save a PNG grid: one row per result (SP, muP), one column per recorded name, width on a log x axis,
    one line per training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names or results[0].sizes[results[0].widths[0]].keys())
    fig, axes = plt.subplots(len(results), len(names), figsize=(3.2 * len(names), 2.8 * len(results)), squeeze=False)
    for row, res in enumerate(results):
        for col, name in enumerate(names):
            ax = axes[row][col]
            for t in range(res.steps):
                ax.plot(res.widths, [res.sizes[w][name][t] for w in res.widths], marker="o", label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if res.mup else 'SP'}: {name}", fontsize=9)
            ax.set_xlabel("width (d_model)", fontsize=8)
            if col == 0:
                ax.set_ylabel("mean |x|", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
