"""The step guard: every optimizer step is checked before its update is applied.

A step is *bad* when its loss or its global (pre-clip) gradient norm is not finite on any rank, or
when its loss is a spike: more than ``loss_spike_z`` standard deviations above the mean of the last
``window`` good steps (once ``min_history`` of them are known). An optional second spike rule
flags a gradient norm above ``grad_norm_ratio`` times the median of the window.

The decision costs one small all-reduce and one host sync per optimizer step: every rank sums a
tensor ``[loss, grad norm, flag of rank 0, ..., flag of rank N-1]`` (a rank's flag is positive when
its own loss or norm is not finite, so the summed flags are the MAX of the flags), reads it back,
and applies the same rule to the same numbers, so every rank takes the same branch.

What happens to a bad step (``action``):

- ``skip``: the update is not applied (the gradients are dropped, so AdamW leaves weights, moments
  and its step count alone); the data moves on, and ``global_step`` and the lr schedule advance as
  if the step had been taken.
- ``stop``: the update is not applied either, ``<checkpoints>/last.ckpt`` is saved, and the run
  exits with :data:`EXIT_GUARD_STOPPED`. ``max_consecutive_skips`` / ``max_skips`` turn ``skip``
  into ``stop`` when the run keeps failing.
- ``rollback``: back to the last good state — the state before the bad step, which the gate
  guarantees is untouched (it runs before the update: weights, optimizer moments, schedule and data
  position are still those of the last good step, so no copy is kept) — and the step is computed
  again on the same micro-batches (the *replay*). Not bad again: a transient fault, logged, and the
  replayed step is applied. Bad again: the data is at fault; the offending samples (those whose own
  loss is bad; else every sample of the flagged ranks' micro-batches) are *quarantined by sample
  key* — they weigh nothing in the loss from then on, in this run and in a resumed one — and the
  step is computed a third time without them and applied (skipped if it is still bad).
  ``max_rollbacks`` turns it into ``stop``; ``rewarm_steps`` ramps the lr up again after it.

Where the check runs: DDP and FSDP call the gate from
:meth:`cgpt.lit_module.CerebrasGPTModule.configure_gradient_clipping` (the norm is the one
clipping computes); DeepSpeed calls it inside its ZeRO optimizer's step, after the norm and before
the update (:meth:`cgpt.strategies.deepspeed.CgptDeepSpeedStrategy.set_step_gate`). A rollback's
recomputations run inside the gate under DDP and FSDP; under DeepSpeed, where nothing can be
recomputed inside the ZeRO step, the gate drops the computation it judges and the next one runs
through the engine once its step has returned (:meth:`StepGuard.run_deferred`).
Under fp16 with a GradScaler the guard stands aside: the scaler already skips non-finite steps.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cgpt.config import ConfigError
from cgpt.weights import LAST

# Exit status of a run the guard stopped (after saving its checkpoint).
EXIT_GUARD_STOPPED = 4
ACTIONS = ("skip", "stop", "rollback")
# What a rollback in progress asks for (see StepGuard._rollback).
RECOMPUTE, RESUME = "recompute", "resume"


@dataclass
class GuardConfig:
    """The ``guard`` config group (``conf/guard/default.yaml``); see that file for each key."""

    enabled: bool = True
    action: str = "skip"
    loss_spike_z: float | None = 8.0
    grad_norm_ratio: float | None = None
    window: int = 200
    min_history: int = 50
    max_consecutive_skips: int = 5
    max_skips: int = 100
    max_rollbacks: int = 10
    rewarm_steps: int = 0
    exclude_keys: list[int] = field(default_factory=list)
    include_keys: list[int] | str = field(default_factory=list)

    def __post_init__(self) -> None:
        self.exclude_keys = [int(k) for k in self.exclude_keys or []]
        if self.include_keys != "all":
            if isinstance(self.include_keys, str):
                raise ConfigError(f"guard.include_keys={self.include_keys!r}: use a list of sample keys or 'all'")
            self.include_keys = [int(k) for k in self.include_keys or []]
        if self.max_rollbacks < 1 or self.rewarm_steps < 0:
            raise ConfigError(
                f"guard.max_rollbacks={self.max_rollbacks} must be >= 1 and guard.rewarm_steps={self.rewarm_steps} >= 0"
            )
        if self.action not in ACTIONS:
            raise ConfigError(f"guard.action={self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.window < 2 or not 2 <= self.min_history <= self.window:
            raise ConfigError(
                f"guard.window={self.window}, guard.min_history={self.min_history}: need 2 <= min_history <= window"
            )
        for key in ("loss_spike_z", "grad_norm_ratio"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"guard.{key}={value} must be positive (or null to switch that rule off)")
        if self.max_consecutive_skips < 1 or self.max_skips < 1:
            raise ConfigError("guard.max_consecutive_skips and guard.max_skips must be >= 1")

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> GuardConfig:
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown guard keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**config)


class StepGuard(L.Callback):
    """Checks each optimizer step (see the module docstring) and records what it did.

    The module (DDP, FSDP) or the strategy (DeepSpeed) calls :meth:`decide` once per optimizer step,
    on every rank, after the gradients are final and before the update. The guard's state (windows,
    counters, events) is saved in checkpoints, so a resumed run continues the same statistics.

    Args:
        config: the ``guard`` config.
        dirpath: checkpoint folder (where ``stop`` saves ``last.ckpt``).
    """

    def __init__(self, config: GuardConfig, dirpath: str) -> None:
        self.config = config
        self.dirpath = Path(dirpath)
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)
        self.events: list[dict[str, Any]] = []
        self.skipped = 0
        self.consecutive = 0
        self.max_loss_z: float | None = None  # the largest score a good step reached: how close to a false alarm
        self.max_norm_ratio: float | None = None
        self.stop_reason: str | None = None
        self.inactive: str | None = None  # why the guard stands aside in this run (fp16 loss scaling)
        self.saved_step: int | None = None
        self._trainer: L.Trainer | None = None
        self._loss: torch.Tensor | None = None  # this optimizer step's mean loss so far (on the device)
        self._new_step = True
        self._event_this_step = False
        self.rollbacks = 0
        self.replays = {"data": 0, "transient": 0}
        self.quarantine: set[int] = set(config.exclude_keys)  # sample keys that weigh nothing in the loss
        self.rewarm_left = 0
        self._module: Any = None  # the CerebrasGPTModule (rollback recomputes steps through it)
        self.deferred = False  # DeepSpeed: a rollback's recomputations run after the engine's step (run_deferred)
        self._pending: Generator[str, _Verdict | None, bool] | None = None  # the rollback in progress
        self._request: str | None = None  # what it waits for: RECOMPUTE or RESUME
        # Test-only fault points (cgpt.fault_injection): called with the name of the point reached.
        self.fault_points: list[Callable[[str], None]] = []

    @property
    def stopped(self) -> bool:
        """True once the run saved its checkpoint and stopped because of the guard."""
        return self.saved_step is not None

    # --- wiring --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.inactive = _FP16
        elif stage == "fit" and hasattr(pl_module, "step_gate"):
            pl_module.step_gate = self.decide
            if self.config.action == "rollback":
                pl_module.keep_step_batches = True
                self._module = pl_module
                # DeepSpeed: the gate runs inside the engine's step, where nothing can be recomputed; a
                # rollback drops that computation and runs the next one once the step has returned.
                self.deferred = getattr(trainer.strategy, "set_step_gate", None) is not None
                if self.deferred:
                    pl_module.after_optimizer_step = self.run_deferred

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install = getattr(trainer.strategy, "set_step_gate", None)
        if install is not None and self.inactive is None:  # DeepSpeed: the engine owns the step, the gate goes in it
            if not install(self.decide):
                self.inactive = _FP16
        if self.inactive is not None:
            _print(trainer, f"guard: inactive: {self.inactive}")
        self.consecutive = 0  # a (re)start is a fresh chance; the per-run cap max_skips still counts
        if hasattr(pl_module, "set_excluded_keys"):
            pl_module.set_excluded_keys(sorted(self.quarantine))
            if self.quarantine:
                _print(trainer, f"guard: {len(self.quarantine)} quarantined sample(s) weigh nothing in the loss")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "step_gate", None) == self.decide:
            pl_module.step_gate = None
        if getattr(pl_module, "after_optimizer_step", None) == self.run_deferred:
            pl_module.after_optimizer_step = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Lightning has divided each micro-batch's loss by accumulate_grad_batches: their sum is the step's mean.
        loss = loss.detach().float()
        self._loss = loss.clone() if self._new_step or self._loss is None else self._loss + loss
        self._new_step = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        self._new_step = True
        logging_step = getattr(pl_module, "_logging_step", None)
        if self._event_this_step or (logging_step is not None and logging_step(trainer.global_step)):
            # A running count (a logger keeps the last value of a key, so a per-event flag would linger):
            # it rises on the steps that were dropped. On event and logging steps only (each self.log
            # costs ~0.3 ms); a CPU tensor, so no host-device copy.
            for key, value in (("skipped_steps", self.skipped), ("rollbacks", self.rollbacks),
                               ("transient_faults", self.replays["transient"]),
                               ("quarantined_samples", len(self.quarantine))):  # fmt: skip
                pl_module.log(f"guard/{key}", torch.tensor(float(value), dtype=torch.float64))
        self._event_this_step = False
        if self.stop_reason is not None and not self.stopped:
            path = self.dirpath / LAST
            trainer.save_checkpoint(path)
            self.saved_step = trainer.global_step
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # no final validation of a run that is being stopped
            _print(trainer, f"guard: stopped at step {trainer.global_step}: {self.stop_reason}; saved {path}")

    # --- the decision --------------------------------------------------------------------------
    def decide(self, grad_norm: torch.Tensor | float | None) -> bool:
        """Whether to drop this step's update. Called once per optimizer step on every rank (a collective).

        ``grad_norm`` is the global pre-clip gradient norm (identical on every rank), None if unknown.
        """
        loss = self._loss if self._loss is not None else torch.zeros(())
        self._new_step = True
        has_norm = grad_norm is not None
        verdict = self._agree(loss, grad_norm)
        if self._pending is not None:  # a recomputation the rollback asked for (DeepSpeed: judged in the engine's step)
            return self._drive(verdict)
        if verdict.reason is None:
            self._good(verdict, has_norm)
            return False
        if self.config.action == "rollback" and self._module is not None:
            self._pending = self._rollback(verdict, has_norm)
            return self._drive(None)
        return self._bad(verdict, has_norm)

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> _Verdict:
        """The one all-reduce and host sync: every rank gets the same numbers and the same verdict."""
        device = loss.device
        norm = torch.as_tensor(math.nan if grad_norm is None else grad_norm)
        norm = norm.detach().to(device=device, dtype=torch.float64).reshape(1)
        world, rank = _world()
        flags = torch.zeros(world, dtype=torch.float64, device=device)
        # This rank's loss is its own; the norm is global (the same on every rank), so it is judged after the sum.
        flags[rank] = (~torch.isfinite(loss)).double()
        buf = torch.cat([loss.detach().double().reshape(1), norm, flags])
        if world > 1:
            torch.distributed.all_reduce(buf)
        values = buf.tolist()  # the one host sync
        mean_loss, mean_norm = values[0] / world, values[1] / world
        bad = {r: int(f) for r, f in enumerate(values[2:]) if f > 0}
        reason, kind = self._judge(mean_loss, mean_norm, bad, grad_norm is not None)
        return _Verdict(reason, kind, mean_loss, mean_norm, sorted(bad))

    def _good(self, verdict: _Verdict, has_norm: bool) -> None:
        self.consecutive = 0
        self.losses.append(verdict.loss)
        if has_norm:
            self.norms.append(verdict.norm)
        if self.rewarm_left > 0:  # the schedule sets the lr afresh at its next step: this scales one update
            factor = (self.config.rewarm_steps - self.rewarm_left + 1) / (self.config.rewarm_steps + 1)
            self.rewarm_left -= 1
            for optimizer in self._trainer.optimizers if self._trainer is not None else []:
                for group in optimizer.param_groups:
                    group["lr"] *= factor

    def _bad(self, verdict: _Verdict, has_norm: bool) -> bool:
        """skip or stop (and the caps that turn skip into stop)."""
        step, reason = self._step(), verdict.reason
        self.skipped += 1
        self.consecutive += 1
        action = "skip" if self.config.action == "rollback" else self.config.action
        if action == "skip" and self.consecutive >= self.config.max_consecutive_skips:
            action = "stop"
            self.stop_reason = (
                f"{self.consecutive} bad steps in a row (guard.max_consecutive_skips="
                f"{self.config.max_consecutive_skips}); {_ADVICE}"
            )
        elif action == "skip" and self.skipped >= self.config.max_skips:
            action = "stop"
            cap = self.config.max_skips
            self.stop_reason = f"{self.skipped} bad steps in this run (guard.max_skips={cap}); {_ADVICE}"
        elif action == "stop":
            self.stop_reason = f"guard.action=stop: {reason}"
        self._event(verdict, has_norm, step, action=action)
        _print(self._trainer, f"guard: step {step}: {reason} -> {'update skipped' if action == 'skip' else 'stop'}")
        return True

    def _event(self, verdict: _Verdict, has_norm: bool, step: int, **extra: Any) -> dict[str, Any]:
        event = {"step": step, "kind": verdict.kind, "loss": _finite_or_str(verdict.loss),
                 "grad_norm": _finite_or_str(verdict.norm) if has_norm else None,
                 "ranks": verdict.ranks, "detail": verdict.reason, **extra}  # fmt: skip
        self.events.append(event)
        self._event_this_step = True
        return event

    # --- rollback: replay, quarantine, recompute -----------------------------------------------
    def _drive(self, value: _Verdict | None) -> bool:
        """Send ``value`` to the rollback in progress and carry out what it asks for, until it is done
        (returns its answer: whether to drop the update of the computation judged last) or it needs a
        recomputation that cannot run here (deferred: the gate is inside DeepSpeed's step; returns True,
        this computation is dropped, and :meth:`run_deferred` goes on once the step has returned)."""
        try:
            request = self._pending.send(value)
            while not self.deferred:
                value = self._agree(*self._module.recompute_step()) if request == RECOMPUTE else None
                request = self._pending.send(value)
        except StopIteration as done:
            self._pending = self._request = None
            return done.value
        self._request = request
        return True

    def run_deferred(self) -> None:
        """After DeepSpeed's optimizer step has returned: the rollback's recomputations, each a forward
        and backward of the step's micro-batches through the engine and an engine step, inside which
        the gate judges it (:meth:`decide` sends the verdict on); the diagnosis of the samples between
        them. Nothing to do on the steps without a rollback."""
        while self._pending is not None:
            if self._request == RECOMPUTE:
                self._loss, _ = self._module.recompute_step()
                self._trainer.strategy.step_recomputed()
            else:
                self._drive(None)

    def _rollback(self, verdict: _Verdict, has_norm: bool) -> Generator[str, _Verdict | None, bool]:
        """Back to the state before this step (untouched: the gate precedes the update), replay the
        step once on the same micro-batches, and quarantine its bad samples if the fault reproduces.

        A generator (run by :meth:`_drive`): it yields RECOMPUTE to get the verdict of a recomputation
        of the step, RESUME to continue outside DeepSpeed's step (the diagnosis runs forwards), and
        returns whether to drop the update of the computation judged last."""
        step, module = self._step(), self._module
        if self.rollbacks >= self.config.max_rollbacks:
            self.stop_reason = (
                f"{self.rollbacks} rollbacks in this run (guard.max_rollbacks={self.config.max_rollbacks}) and step "
                f"{step} is bad again ({verdict.reason}); {_ADVICE}"
            )
            self._event(verdict, has_norm, step, action="stop")
            _print(self._trainer, f"guard: step {step}: {verdict.reason} -> stop (rollback cap)")
            return True
        self.rollbacks += 1
        self._fault_point("replay")
        replay = yield RECOMPUTE
        if replay.reason is None:
            self.replays["transient"] += 1
            self._event(verdict, has_norm, step, action="rollback", replay="transient", quarantined=[])
            _print(self._trainer, f"guard: step {step}: {verdict.reason} -> rolled back and replayed: not "
                                  "reproduced (transient fault), the replayed step is applied")  # fmt: skip
            self._good(replay, has_norm)
            return False
        self.replays["data"] += 1
        yield RESUME
        keys = self._suspects(replay)
        self.quarantine |= set(keys)
        module.set_excluded_keys(sorted(self.quarantine))
        self._fault_point("quarantine")
        again = yield RECOMPUTE
        applied = again.reason is None
        event = self._event(verdict, has_norm, step, action="rollback", replay="data", quarantined=keys,
                            applied=applied)  # fmt: skip
        where = f"quarantined {len(keys)} sample(s) {_shorten(keys)}"
        if applied:
            _print(self._trainer, f"guard: step {step}: {verdict.reason} -> rolled back and replayed: reproduced "
                                  f"(data); {where}; the step without them is applied")  # fmt: skip
            self.rewarm_left = self.config.rewarm_steps
            self._good(again, has_norm)
            return False
        self.events.remove(event)  # it is recorded once, as the skip (or stop) it turns into
        verdict = _Verdict(f"{again.reason} (after rollback: {where})", again.kind, again.loss, again.norm, again.ranks)
        return self._bad(verdict, has_norm)

    def _suspects(self, replay: _Verdict) -> list[int]:
        """The keys of the samples to quarantine, the same list on every rank (collectives).

        Narrowed by each sample's own loss where it tells: the samples whose loss is not finite,
        or above the spike limit for a loss spike. Otherwise (a non-finite or spiking gradient norm
        with ordinary per-sample losses) every sample of the step's micro-batches on the ranks
        whose loss was bad, or on every rank when none was.
        """
        losses = self._module.sample_losses()
        mine = [k for k, value in losses if not math.isfinite(value)]
        if not mine and replay.kind == "loss_spike" and self.config.loss_spike_z is not None:
            mean, std = _mean_std(self.losses)
            mine = [k for k, value in losses if value > mean + self.config.loss_spike_z * std]
        found = sorted(set().union(*_all_gather(mine)))
        if found:
            return found
        per_rank = _all_gather(self._module.step_keys())
        ranks = replay.ranks or range(len(per_rank))
        return sorted({k for r in ranks for k in per_rank[r]})

    def _fault_point(self, name: str) -> None:
        for hook in self.fault_points:
            hook(name)

    def _judge(self, loss: float, norm: float, bad: dict[int, int], has_norm: bool) -> tuple[str | None, str]:
        bad_norm = has_norm and not math.isfinite(norm)
        if bad or not math.isfinite(loss) or bad_norm:
            parts = [f"loss on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, sorted(bad)))}"] if bad else []
            parts += ["global gradient norm"] if bad_norm else []
            return f"non-finite {' and '.join(parts) or 'mean loss'}", "non_finite"
        c = self.config
        if len(self.losses) >= c.min_history and c.loss_spike_z is not None:
            mean, std = _mean_std(self.losses)
            std = max(std, 1e-8 * max(abs(mean), 1.0))
            z = (loss - mean) / std
            if z > c.loss_spike_z:
                return (
                    f"loss spike: {loss:.4f} is {z:.1f} std above the mean {mean:.4f} of the last "
                    f"{len(self.losses)} steps (guard.loss_spike_z={c.loss_spike_z})",
                    "loss_spike",
                )
            self.max_loss_z = z if self.max_loss_z is None else max(self.max_loss_z, z)
        if has_norm and len(self.norms) >= c.min_history:
            median = statistics.median(self.norms)
            ratio = norm / median if median > 0 else math.inf
            if c.grad_norm_ratio is not None and ratio > c.grad_norm_ratio:
                return (
                    f"gradient-norm spike: {norm:.4g} is {ratio:.1f}x the median {median:.4g} of the last "
                    f"{len(self.norms)} steps (guard.grad_norm_ratio={c.grad_norm_ratio})",
                    "grad_norm_spike",
                )
            self.max_norm_ratio = ratio if self.max_norm_ratio is None else max(self.max_norm_ratio, ratio)
        return None, ""

    def _step(self) -> int:
        """The number of the optimizer step being decided (as the progress lines count: 1-based)."""
        return (self._trainer.global_step if self._trainer is not None else len(self.losses) + self.skipped) + 1

    # --- reporting and checkpoints -------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The ``guard`` section of summary.json."""
        return {
            "enabled": True,
            "inactive": self.inactive,
            "action": self.config.action,
            "skipped_steps": [e["step"] for e in self.events if e["action"] != "rollback"],
            "events": self.events,
            "stopped": self.stop_reason,
            "max_loss_z_of_a_good_step": self.max_loss_z,
            "max_grad_norm_ratio_of_a_good_step": self.max_norm_ratio,
            "rollbacks": self.rollbacks,
            "replays": dict(self.replays),
            "quarantined_keys": sorted(self.quarantine),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "events": self.events,
                "skipped": self.skipped, "consecutive": self.consecutive, "max_loss_z": self.max_loss_z,
                "max_norm_ratio": self.max_norm_ratio, "config": asdict(self.config), "rollbacks": self.rollbacks,
                "replays": dict(self.replays), "quarantine": sorted(self.quarantine),
                "rewarm_left": self.rewarm_left}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.events = list(state.get("events", []))
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.max_loss_z = state.get("max_loss_z")
        self.max_norm_ratio = state.get("max_norm_ratio")
        self.rollbacks = int(state.get("rollbacks", 0))
        self.replays = {"data": 0, "transient": 0, **state.get("replays", {})}
        self.rewarm_left = int(state.get("rewarm_left", 0))
        include = self.config.include_keys
        saved = set() if include == "all" else set(state.get("quarantine", [])) - set(include)
        self.quarantine = saved | set(self.config.exclude_keys)


_FP16 = "fp16 with dynamic loss scaling skips non-finite steps itself (and expects some); no spike checks either"
_ADVICE = (
    "the run keeps producing bad steps: inspect the events in summary.json, lower optim.lr or "
    "re-warm (scheduler.warmup_steps), or raise the cap and re-run the same command to resume"
)


@dataclass
class _Verdict:
    """What the ranks agreed on for one computation of a step."""

    reason: str | None  # why it is bad; None: good
    kind: str
    loss: float  # mean over ranks
    norm: float
    ranks: list[int]  # ranks whose own loss was not finite


def _all_gather(items: list[int]) -> list[list[int]]:
    """Every rank's list (only on events: a pickled gather)."""
    world, _ = _world()
    if world == 1:
        return [items]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, items)
    return out


def _shorten(keys: list[int]) -> str:
    return str(keys) if len(keys) <= 8 else f"[{', '.join(map(str, keys[:8]))}, ...]"


def _mean_std(values: deque[float]) -> tuple[float, float]:
    """Mean and population standard deviation in plain floats (statistics.pstdev's exact arithmetic
    cost ~0.2 ms per step over a 200-step window)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / n)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _print(trainer: L.Trainer | None, msg: str) -> None:
    if trainer is None or trainer.is_global_zero:
        print(msg, file=sys.stdout, flush=True)


def build_guard(config: dict[str, Any] | None, dirpath: str) -> StepGuard | None:
    """The guard of a run's ``guard`` config (None when it is switched off)."""
    guard = GuardConfig.from_dict(config)
    return StepGuard(guard, dirpath) if guard.enabled else None
