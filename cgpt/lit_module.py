"""The LightningModule that trains a Cerebras-GPT model with the published recipe."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cgpt.config import ConfigError, ModelConfig, TrainingDefaults, normalize_preset_name
from cgpt.hardware import resolve_compile, resolve_fused_loss
from cgpt.lm_head import IGNORE_INDEX
from cgpt.model import GPT
from cgpt.optim import OptimConfig, SchedulerConfig, build_optimizer, build_scheduler, resolve_schedule
from cgpt.presets import PRESETS
from cgpt.strategies import average_ddp_gradients, clip_grad_norm, clipped_grad_norm, clips_in_optimizer_step, grad_norm


class CerebrasGPTModule(L.LightningModule):
    """Next-token language modelling on packed ``(B, seq_len + 1)`` token batches.

    It receives serialisable configs (plain dicts) and builds the network in
    :meth:`configure_model`, so strategies can shard at build time and a checkpoint reloads
    with ``CerebrasGPTModule.load_from_checkpoint(path)`` alone.

    Args:
        model: :class:`~cgpt.config.ModelConfig` fields; ``{"name": "cerebras-gpt-111m"}`` is a preset.
        optim: :class:`~cgpt.optim.OptimConfig` fields; unset values take the preset's recipe.
        scheduler: :class:`~cgpt.optim.SchedulerConfig` fields; likewise.
        compile: ``torch.compile`` the model (in place: no ``_orig_mod`` prefix in checkpoints);
            ``"auto"`` compiles where :func:`cgpt.hardware.default_compile` says it is faster (CUDA).
        lora: :class:`~cgpt.lora.LoRAConfig` fields to train low-rank adapters on a frozen base;
            ``None`` (or ``enabled: false``) trains every weight.
        fused_loss: compute the loss with the fused chunked head (:mod:`cgpt.lm_head`); ``"auto"``
            uses it where :func:`cgpt.hardware.default_fused_loss` says it is faster (CPUs).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool | str | None = False,
        lora: dict[str, Any] | None = None,
        fused_loss: bool | str | None = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(model)
        self.optim_config = OptimConfig(**(optim or {}))
        self.scheduler_config = SchedulerConfig(**(scheduler or {}))
        self.compile = compile
        self.fused_loss = resolve_fused_loss(fused_loss)
        self.lm_head_chunk: int | None = None  # tokens per fused-loss chunk (cgpt.hardware.choose_lm_head)
        self.lm_head_pad: int | None = None  # full-logits loss over the vocabulary padded to a multiple of this
        self.recipe = _recipe_for(self.model_config)
        self.model: GPT | None = None
        self.tokens_per_step = 0  # set by set_runtime(); used for "tokens seen"
        self.seq_len: int | None = None  # set by set_runtime(); used for FLOPs per token (MFU)
        self.lora = dict(lora) if lora and lora.get("enabled", True) else None
        self.init_from: str | None = None  # set by set_init_from(); not a hyperparameter
        self._step_loss: tuple[int, torch.Tensor, int] | None = None  # (step, sum, micro-batches) of train/loss
        self._val_sums: torch.Tensor | None = None  # (sum of weighted losses, weight) this validation
        self.val_names: list[str | None] = [None]  # what each validation loader scores; see set_val_sources
        self.val_weights: Callable[[int], Sequence[float]] = lambda step: [1.0]
        self._source_sums: torch.Tensor | None = None  # (loaders, 2): the same sums per validation loader
        self.rng_after_build: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see configure_model
        # Called with each optimizer step's pre-clip global gradient norm; True drops the update
        # (set by cgpt.guard.StepGuard; under DeepSpeed the strategy calls it inside its own step).
        self.step_gate: Callable[[torch.Tensor | None], bool] | None = None
        # Quarantined sample keys (set by the guard): those samples weigh nothing in the training loss.
        self.excluded_keys: torch.Tensor | None = None
        # guard.action=rollback: keep the optimizer step's micro-batches (references, no copy) so the
        # step can be computed again (recompute_step, sample_losses).
        self.keep_step_batches = False
        self._step_batches: list[dict[str, torch.Tensor]] = []
        # Called after each optimizer step has returned (set by the guard under DeepSpeed, whose gate
        # runs inside the engine's step: a rollback's recomputations run from here).
        self.after_optimizer_step: Callable[[], None] | None = None
        self._clip_args: tuple[Any, float | None, str | None] = (None, None, None)

    # --- runtime -------------------------------------------------------------------------------
    def set_runtime(self, seq_len: int, global_batch_size: int) -> None:
        """Pass the values known only at launch: training sequence length and global batch."""
        if seq_len > self.model_config.block_size:
            raise ConfigError(
                f"data sequence length {seq_len} exceeds the model's context {self.model_config.block_size}: "
                "prepare the data with a shorter --seq-len or use a model with a larger block_size"
            )
        self.tokens_per_step = seq_len * global_batch_size
        self.seq_len = seq_len

    def set_val_sources(
        self, names: Sequence[str | None], weights: Sequence[float] | Callable[[int], Sequence[float]]
    ) -> None:
        """Name the validation loaders (the datamodule's ``val_names``): loader ``i`` logs
        ``val/loss/<names[i]>`` (None: nothing of its own), and ``val/loss`` is the mean of the
        loaders' losses with ``weights`` (a mixture's weights, or a function of the optimizer step
        giving them; ``[1, 0, ...]``: the first loader's). A runtime value, not a hyperparameter."""
        fixed = None if callable(weights) else [float(w) for w in weights]
        self.val_names = list(names)
        self.val_weights = (lambda step: fixed) if fixed is not None else weights
        first = list(self.val_weights(0))
        if len(first) != len(self.val_names) or not sum(first) > 0:
            raise ValueError(f"one weight per validation loader, not all zero: {self.val_names}, {first}")

    def set_init_from(self, source: str | None) -> None:
        """Load the weights of ``source`` (see :mod:`cgpt.init_from`) when the model is built.

        A runtime value, not a hyperparameter: a checkpoint of this run reloads without the source.
        """
        self.init_from = str(source) if source else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = GPT(self.model_config)
        # Where the generator stood when GPT initialised its weights: reinitialize_weights() restores
        # it, since LoRA's adapters draw from it next.
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        self.rng_after_build = (torch.get_rng_state(), cuda)
        self.model.fused_loss = self.fused_loss
        self.model.lm_head.chunk = self.lm_head_chunk
        self.model.lm_head.pad_vocab_to = self.lm_head_pad
        # Built on empty partitions (DeepSpeed ZeRO-3's zero.Init): the strategy gathers them after the
        # build and calls reinitialize_weights(), which loads init_from then.
        partitioned = any(p.numel() == 0 for p in self.model.parameters())
        if self.init_from and not partitioned:
            from cgpt.init_from import load_weights

            load_weights(self.model, self.init_from)
        if self.lora:
            from cgpt.lora import LoRAConfig, apply_lora, format_report, parameter_report

            apply_lora(self.model, LoRAConfig.from_dict(self.lora))
            if self.global_rank == 0:
                print(f"LoRA {self.lora}: {format_report(parameter_report(self.model))}", flush=True)
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if resolve_compile(self.compile, device):
            self.model.compile()

    def reinitialize_weights(self) -> None:
        """Initialise the built model again exactly as :meth:`configure_model` did: GPT init from the
        generator state right after the build, ``init_from`` weights, then fresh LoRA adapters.

        A strategy that built the model on empty partitions (ZeRO-3) calls this on rank 0 with the
        parameters gathered; the result equals what a single process builds from the same seed.
        """
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            cpu_state, cuda_state = self.rng_after_build or (None, None)
            if cpu_state is not None:
                torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)
            self.model.init_weights()
            if self.init_from:
                from cgpt.init_from import load_weights

                load_weights(self.model, self.init_from)
            from cgpt.lora import has_lora, reset_adapters

            if has_lora(self.model):
                reset_adapters(self.model)

    # --- steps ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A training micro-batch's loss (fine-tuning overrides it): the training step and the guard's
        recomputation of a step both call it."""
        return self.training_loss(batch["tokens"], batch.get("sample_keys"))

    def training_loss(self, tokens: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss over the tokens of the samples that are not quarantined.

        Batch shapes and order stay as they are: a quarantined sample's targets are ignored, so the
        data order (and resume) do not depend on what was quarantined. A micro-batch that is all
        quarantined gives a zero loss with zero gradients (through the same forward, so sharded
        strategies run the same collectives on every rank).
        """
        targets = tokens[:, 1:]
        if self.excluded_keys is not None and keys is not None:
            excluded = torch.isin(keys, self.excluded_keys.to(keys.device))
            if bool(excluded.all()):  # a host sync, only in runs with quarantined samples
                blank = torch.zeros_like(tokens[:1, 1:])
                return self.model.loss(blank, blank) * 0.0
            targets = targets.masked_fill(excluded[:, None], IGNORE_INDEX)
        return self.model.loss(tokens[:, :-1], targets)

    def set_excluded_keys(self, keys: list[int]) -> None:
        """Quarantine these sample keys (an empty list re-includes every sample)."""
        self.excluded_keys = torch.tensor(sorted(keys), dtype=torch.int64, device=self.device) if keys else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if self.keep_step_batches:
            self._step_batches.append(batch)
        # No host-device sync per step: Lightning turns prog_bar values into Python numbers after
        # every batch, and a Python float logged on a GPU is a blocking host-to-device copy. So no
        # prog_bar here and host-side values go in as CPU tensors.
        if self._logging_step():
            self._log_step_loss(loss.detach())
        return loss

    def _log_step_loss(self, loss: torch.Tensor) -> None:
        """Log ``train/loss`` (and ``train/ppl``): the optimizer step's loss, the mean over its
        micro-batches (summed on the device as they come) and over the ranks (one all-reduce, on the
        step's last micro-batch). Micro-batches hold equal token counts, so this is the global batch's
        mean at any world size, micro-batch or accumulation: a run resumed at another world size logs
        the same values."""
        step = self.global_step
        if self._step_loss is None or self._step_loss[0] != step:
            self._step_loss = (step, torch.zeros_like(loss), 0)
        _, total, count = self._step_loss
        self._step_loss = (step, total + loss, count + 1)
        mean = self._step_loss[1] / self._step_loss[2]
        if self._trainer is not None:
            if self.trainer.fit_loop._should_accumulate():
                return
            mean = self.trainer.strategy.reduce(mean, reduce_op="mean")  # every rank is here: same step
        self._step_loss = None
        self.log("train/loss", mean)
        self.log("train/ppl", torch.exp(mean))
        self.log("tokens_seen", torch.tensor((step + 1) * self.tokens_per_step, dtype=torch.float64))

    def _logging_step(self, step: int | None = None) -> bool:
        """Whether the optimizer step being computed is one whose logged values are written
        (every ``trainer.log_every_n_steps`` and the last step).

        Each ``self.log`` costs a slow walk through Lightning's result collection (about 0.3 ms on a
        CPU), so the five per-step values are logged only when they are used: the CPU benchmark in
        docs/design/cpu-training-speed.md measured this as most of the framework's per-step overhead.
        ``callback_metrics`` then hold the values of the latest logging step.
        """
        if self._trainer is None:
            return True
        trainer, step = self._trainer, self.global_step + 1 if step is None else step
        every = trainer.log_every_n_steps
        return bool(every) and step % every == 0 or (trainer.max_steps or 0) > 0 and step >= trainer.max_steps

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        tokens = batch["tokens"]  # every sample: quarantine keys name training samples
        loss = self.model.loss(tokens[:, :-1], tokens[:, 1:])
        # Batches are equal-sized, so the mean of batch means is the per-token mean.
        if len(self.val_names) == 1:
            self._log_val_loss(loss, 1)
        else:  # one loader per source: summed here, logged once all ranks' sums are in
            if self._source_sums is None:
                self._source_sums = torch.zeros(len(self.val_names), 2, dtype=torch.float64, device=loss.device)
            self._source_sums[dataloader_idx] += torch.stack(
                [loss.detach().double(), loss.new_ones((), dtype=torch.float64)]
            )
        return loss

    def _log_val_loss(self, loss: torch.Tensor, weight: int | torch.Tensor) -> None:
        """Accumulate a batch's mean loss, weighted, for the epoch's ``val/loss`` (the per-token mean
        over all ranks) and ``val/ppl`` (exp of that mean, not a mean of batch exps), both logged in
        :meth:`on_validation_epoch_end` from sums reduced over the ranks. (Lightning's own weighted
        ``sync_dist`` mean came out as a mean of rank means when ranks held different weights: SFT's
        validation under DDP reported 9.564 for a split whose per-token mean was 9.466.)"""
        if self._val_sums is None:
            self._val_sums = torch.zeros(2, dtype=torch.float64, device=loss.device)
        self._val_sums += torch.stack([loss.detach().double() * weight, torch.as_tensor(weight).to(self._val_sums)])

    def on_validation_epoch_start(self) -> None:
        self._val_sums = self._source_sums = None

    def on_validation_epoch_end(self) -> None:
        if len(self.val_names) > 1:
            self._log_source_losses()
            return
        if self._val_sums is None:  # no validation batch on this rank
            self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        total, weight = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self._log_reduced("val/loss", (total / weight).float(), prog_bar=True)
        self._log_reduced("val/ppl", torch.exp(total / weight).float())

    def _log_source_losses(self) -> None:
        """``val/loss/<source>`` per validation loader, and ``val/loss`` (with ``val/ppl``) as their
        weighted mean: per-token means over all ranks (one all-reduce of the per-loader sums)."""
        if self._source_sums is None:  # no validation batch on this rank
            self._source_sums = torch.zeros(len(self.val_names), 2, dtype=torch.float64, device=self.device)
        sums = self.trainer.strategy.reduce(self._source_sums, reduce_op="sum")
        means = sums[:, 0] / sums[:, 1].clamp_min(1)
        for name, mean in zip(self.val_names, means, strict=True):
            if name is not None:
                self._log_reduced(f"val/loss/{name}", mean.float(), add_dataloader_idx=False)
        weights = torch.tensor(list(self.val_weights(self.global_step)), dtype=torch.float64, device=means.device)
        loss = (weights * means).sum() / weights.sum()
        self._log_reduced("val/loss", loss.float(), prog_bar=True, add_dataloader_idx=False)
        self._log_reduced("val/ppl", torch.exp(loss).float(), add_dataloader_idx=False)

    def _log_reduced(self, name: str, value: torch.Tensor, **kwargs: Any) -> None:
        """Log an epoch-level value that is already reduced over the ranks (equal on every rank).
        ``sync_dist`` with ``max`` of equal values changes nothing (a mean could, by one rounding,
        at world sizes that are not powers of two); it tells Lightning the value is synced, which
        silences its advice to sync it."""
        self.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm, log the pre-clip norm as ``grad_norm``, and ask the step gate
        (:mod:`cgpt.guard`) whether to apply the update: if not, the gradients are dropped, so the
        optimizer leaves weights and moments alone.

        Lightning's AMP plugin refuses to clip for fused optimizers even in bf16, where no grad
        scaler is involved; without a scaler we clip directly. With an fp16 scaler, Lightning's
        own path runs (unscale first), the optimizer is built unfused, and the gate stands aside
        (the scaler skips non-finite steps itself).
        """
        if clips_in_optimizer_step(self.trainer.strategy):
            return  # DeepSpeed clips (and gates) inside its optimizer step (gradient_clipping = gradient_clip_val)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            if gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        self._clip_args = (optimizer, gradient_clip_val, gradient_clip_algorithm)
        norm = self._clip(optimizer, gradient_clip_val, gradient_clip_algorithm, log=self._logging_step())
        if self.step_gate is not None and self.step_gate(norm):
            for p in self.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: no update, no moment or step change

    def _clip(self, optimizer: Any, clip_val: float | None, algorithm: str | None, log: bool) -> torch.Tensor | None:
        """Clip as configured; returns the pre-clip global norm the gate judges (None without a gate
        when clipping does not compute it)."""
        norm = None
        if self.step_gate is not None and (not clip_val or algorithm == "value"):
            norm = grad_norm(self.parameters())  # the pre-clip norm the gate needs when clipping does not give it
        if clip_val and algorithm == "value":
            self.clip_gradients(optimizer, clip_val, algorithm)
        elif clip_val:
            norm = clip_grad_norm(self.parameters(), clip_val)  # sharded (FSDP2 DTensor) grads too
            if log:
                self.log("grad_norm", norm)
        return norm

    # --- recomputing a step (guard.action=rollback) --------------------------------------------
    def recompute_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute the current optimizer step's gradients again from its kept micro-batches, with
        the exclusions as they are now; reduce them across ranks as the strategy does and clip.
        Returns the step's mean loss (this rank's) and the pre-clip global norm (None under DeepSpeed,
        whose engine computes it in its step: ``strategy.step_recomputed()``).

        Every rank calls it together (the reductions are collectives). The weights and the
        optimizer state are those before the step: the gate runs before the update.
        """
        trainer = self.trainer
        if clips_in_optimizer_step(trainer.strategy):
            # DeepSpeed: forward and backward through the engine; the norm is computed in the engine's
            # step, which the guard takes next (strategy.step_recomputed), with the gate inside it.
            return trainer.strategy.recompute_step(self._step_batches), None
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        n = len(self._step_batches)
        total = torch.zeros((), device=self.device)
        with trainer.precision_plugin.train_step_context():  # autocast as in the training step
            for batch in self._step_batches:
                loss = self._loss(batch) / n  # as Lightning divides
                loss.backward()  # the raw module, not the DDP wrapper: local gradients (FSDP2 reduces itself)
                total = total + loss.detach().float()
        average_ddp_gradients(trainer.strategy, params)
        return total, self._clip(*self._clip_args, log=False)

    def sample_losses(self) -> list[tuple[int, float]]:
        """(key, loss) of every sample of the current optimizer step's micro-batches, one forward
        per sample (diagnosis of a bad step; every rank calls it together, the same number of times).

        Each forward gets a backward (of zero; the gradients are cleared after): under FSDP2, forwards
        without their backward (with or without autograd) left NaN gradients of the previous
        backward in the last block's next gradients (found by the sharded rollback test). Under
        DeepSpeed each runs as the engine's forward, without autograd: a backward there would reduce
        into ZeRO's gradient partitions.
        """
        out: list[tuple[int, float]] = []
        strategy = self.trainer.strategy
        engine = clips_in_optimizer_step(strategy)  # DeepSpeed: through the engine (ZeRO-3 gathers), no gradients
        with self.trainer.precision_plugin.train_step_context():
            for batch in self._step_batches:
                tokens, keys = batch["tokens"], batch.get("sample_keys")
                if keys is None:
                    continue
                for i in range(len(keys)):
                    sample = (tokens[i : i + 1], keys[i : i + 1])
                    if engine:
                        with torch.no_grad():
                            loss = strategy.engine_forward("training_loss", *sample)
                    else:
                        loss = self.training_loss(*sample)
                        (loss * 0).backward()
                    out.append((int(keys[i]), float(loss)))
        if engine:
            return out
        for p in self.parameters():
            p.grad = None
        return out

    def step_keys(self) -> list[int]:
        """The sample keys of the current optimizer step's micro-batches on this rank."""
        return [k for b in self._step_batches if b.get("sample_keys") is not None for k in b["sample_keys"].tolist()]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Under DeepSpeed (which clips inside its step) log the pre-clip norm the step computed, on the
        same row as DDP's: after the accumulation boundary, global_step counts the step just made."""
        if self.trainer.fit_loop._should_accumulate():
            return
        self._step_batches = []  # the step is done: its micro-batches are not needed any more
        if not clips_in_optimizer_step(self.trainer.strategy):
            return
        if self._logging_step(self.global_step):
            norm = clipped_grad_norm(self.trainer.strategy)
            if norm is not None:
                self.log("grad_norm", norm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.after_optimizer_step is not None:
            self.after_optimizer_step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A consolidated DeepSpeed checkpoint has no optimizer state: resume with fresh Adam moments."""
        if "optimizer_states" not in checkpoint and checkpoint.get("cgpt_consolidated"):
            rank_zero_warn("the consolidated checkpoint has no optimizer state: Adam moments restart from zero")
            checkpoint["optimizer_states"] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step():
            return
        lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
        self.log("lr", torch.tensor(lr, dtype=torch.float64))  # a CPU tensor: no host-device copy

    # --- optimizer -----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ConfigError("trainer.max_steps must be set (> 0): the lr schedule decays to its end")
        lr, eps, _, _ = self.resolved_recipe(max_steps)
        optim_config = self.optim_config
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None and optim_config.fused is None:
            optim_config = OptimConfig(**{**optim_config.__dict__, "fused": False})  # fp16 scaler unscales
        optimizer = build_optimizer(self.model, lr, optim_config, eps, self.model_config.width_mult)
        s = resolve_schedule(self.scheduler_config, self.recipe, max_steps)
        scheduler = build_scheduler(
            optimizer, s.warmup_steps, max_steps, s.decay, s.final_lr_ratio, s.decay_steps, s.step_offset
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def resolved_recipe(self, max_steps: int) -> tuple[float, float, int, str]:
        """(peak lr, eps, warmup steps, decay) after filling unset values from the preset
        (:func:`cgpt.optim.resolve_schedule` has the rest of the schedule)."""
        r = self.recipe
        lr = self.optim_config.lr if self.optim_config.lr is not None else r.lr
        eps = self.optim_config.eps if self.optim_config.eps is not None else r.adam_eps
        s = resolve_schedule(self.scheduler_config, r, max_steps)
        return lr, eps, s.warmup_steps, s.decay

    def on_train_start(self) -> None:
        """Apply the configured schedule at the step this run starts from.

        On a resume the optimizer state brings back the lr of the last step under the old schedule;
        a resume that changes the schedule (``scheduler.step_offset``, ``decay_steps``) takes effect
        from its first step, not one step late.
        """
        offset = self.scheduler_config.step_offset
        if self.global_step + offset < 0:
            raise ConfigError(
                f"scheduler.step_offset={offset} puts step {self.global_step} at schedule position "
                f"{self.global_step + offset} < 0: the offset re-bases a resume (resume=<checkpoint at step "
                f">= {-offset}>); set scheduler.step_offset=0 for a fresh run"
            )
        config = self.trainer.lr_scheduler_configs[0] if self.trainer.lr_scheduler_configs else None
        sched = config.scheduler if config is not None else None
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * fn(sched.last_epoch)


def _recipe_for(config: ModelConfig) -> TrainingDefaults:
    """The preset's published recipe; a custom shape borrows the nearest preset's by width."""
    name = normalize_preset_name(config.name, strict=False)
    if name in PRESETS:
        return TrainingDefaults.from_name(name)
    published = [n for n in PRESETS if n.endswith("-mup") == config.mup and "tiny" not in n and "demo" not in n]
    nearest = min(published, key=lambda n: abs(PRESETS[n]["model"]["d_model"] - config.d_model))
    return TrainingDefaults.from_name(nearest)
