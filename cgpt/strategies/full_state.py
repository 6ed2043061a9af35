"""The full training state of any strategy, gathered to whole tensors: for tests and debugging only.

Nothing in ``conf/`` refers to :class:`StateDump`: it acts only when a test (or someone debugging a
resume) adds it explicitly, e.g.
``+callbacks.dump={_target_: cgpt.strategies.full_state.StateDump, dirpath: /tmp/dump}``.

It writes ``<dirpath>/start.pt`` when training starts (right after a checkpoint is restored, before
any new step), ``<dirpath>/end.pt`` when it ends and, with ``at_steps``, ``<dirpath>/step<N>.pt`` once
optimizer step N is done (a run whose checkpoint of step N another run resumes), on rank 0:
``{"global_step", "world_size",
"params", "exp_avg", "exp_avg_sq", "step"}``, each a dict by the GPT's own parameter names (fp32
master weights and Adam moments, whatever the sharding), so two runs at different world sizes
compare tensor for tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from cgpt.weights.state import gpt_state_dict

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def full_training_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
    """Full fp32 parameters and Adam state by GPT parameter name; a collective: call it on every rank."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return _deepspeed_state(strategy)
    named = dict(pl_module.named_parameters())
    optimizer = trainer.optimizers[0]
    out: dict[str, dict[str, torch.Tensor]] = {"params": {}, **{k: {} for k in MOMENTS}}
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        # Asked for an empty optimizer's state, torch initialises it with a zero-lr step (Adam's step
        # count +1): a fresh run has no moments to report.
        state = get_optimizer_state_dict(pl_module, optimizer, options=options)["state"] if optimizer.state else {}
        for name, p in named.items():
            out["params"][name] = p.full_tensor().detach().float().cpu()
        for name, s in state.items():
            for key in MOMENTS:
                out[key][name] = torch.as_tensor(s[key]).detach().float().cpu()
    else:
        for name, p in named.items():
            out["params"][name] = p.detach().float().cpu()
            for key in MOMENTS:
                if key in optimizer.state.get(p, {}):
                    out[key][name] = torch.as_tensor(optimizer.state[p][key]).detach().float().cpu()
    return {k: gpt_state_dict(v) for k, v in out.items()}


def _deepspeed_state(strategy: Any) -> dict[str, dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = strategy.deepspeed_engine
    out: dict[str, dict[str, torch.Tensor]] = {"params": {}, **{k: {} for k in MOMENTS}}
    started = bool(engine.optimizer.optimizer.state)  # no moments before the first step
    if started and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 link each parameter to its slice of the flat Adam state once, after the first group's
        # first step, when the later groups have no state yet: link again so every group's is readable.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        out["params"][name] = safe_get_full_fp32_param(p).detach().float().cpu()
        for key in MOMENTS[:2] if started else ():
            out[key][name] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
    # ZeRO keeps one Adam step per flat parameter group: the same for every parameter in it.
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    for group in engine.optimizer.optimizer.param_groups:
        steps |= {float(group["step"])} if "step" in group else set()
    for name in out["params"] if steps else ():
        out["step"][name] = torch.tensor(max(steps))
    return {k: gpt_state_dict(v) for k, v in out.items()}


class StateDump(L.Callback):
    """See the module docstring."""

    def __init__(self, dirpath: str, at_steps: list[int] | tuple[int, ...] = ()) -> None:
        self.dirpath = Path(dirpath)
        self.at_steps = set(at_steps)

    def _dump(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        state = full_training_state(trainer, pl_module)  # every rank: gathering is a collective
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": trainer.global_step, "world_size": trainer.world_size, **state},
                       self.dirpath / f"{name}.pt")  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Once per step: with accumulation, the micro-batches before the optimizer step end at the
        # previous step, already dumped or not asked for.
        step = trainer.global_step
        if step in self.at_steps:
            self.at_steps.discard(step)
            self._dump(trainer, pl_module, f"step{step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "end")
