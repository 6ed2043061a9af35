"""Supervised fine-tuning: the LightningModule trained on :mod:`cgpt.data.sft` batches.

The loss falls on response tokens only (targets are ``IGNORE_INDEX`` elsewhere); packed rows get a
block-diagonal causal mask so no example attends to another. Validation can greedily complete
held-out prompts, and a finished run exports its model (Hugging Face folder, LoRA adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cgpt.data.sft import Example, block_causal_mask
from cgpt.lit_module import CerebrasGPTModule
from cgpt.lm_head import IGNORE_INDEX


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross entropy over target tokens, number of target tokens) of one batch."""
    seg = batch.get("segment_ids")
    mask = block_causal_mask(seg) if seg is not None else None
    targets = batch["targets"]
    loss = model.loss(batch["input_ids"], targets, IGNORE_INDEX, attn_mask=mask, position_ids=batch["position_ids"])
    return loss, (targets != IGNORE_INDEX).sum()


# --- the LightningModule ---------------------------------------------------------------------------
class SFTModule(CerebrasGPTModule):
    """:class:`~cgpt.lit_module.CerebrasGPTModule` trained on SFT batches (loss on response tokens only).

    Training steps are the base's with :meth:`_loss` as the SFT loss, so they log the same way: only
    on logging steps and as tensors (no host-device sync per step). Validation logs the per-token
    mean loss over all target tokens and, when :meth:`set_samples` gave prompts, greedily completes
    them, prints them and appends them to ``samples.jsonl``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples: list[Example] = []
        self.sample_max_new_tokens = 64
        self.samples_path: Path | None = None
        self.last_samples: list[dict[str, Any]] = []
        self.export_hf: Path | None = None
        self.positions_per_row: float | None = None
        self.adapters_path: Path | None = None

    def set_runtime(self, seq_len: int, global_batch_size: int) -> None:
        """As the base, but "tokens" per step are the positions rows really hold (see
        :meth:`set_positions_per_row`), not ``seq_len`` per row."""
        super().set_runtime(seq_len, global_batch_size)
        if self.positions_per_row:
            self.tokens_per_step = round(self.positions_per_row * global_batch_size)

    def set_positions_per_row(self, positions: float) -> None:
        """Mean positions per row of the data (:meth:`cgpt.data.sft.SFTDataModule.positions_per_row`)."""
        self.positions_per_row = positions

    def set_exports(self, hf_dir: str | os.PathLike | None, adapters_path: str | os.PathLike | None) -> None:
        """Where the finished model goes: a Hugging Face folder (LoRA merged) and the LoRA adapters."""
        self.export_hf = Path(hf_dir) if hf_dir else None
        self.adapters_path = Path(adapters_path) if adapters_path else None

    def on_train_end(self) -> None:
        """Export once training reached ``max_steps`` (not after an interruption). Rank 0 writes;
        the model must be whole on it (:func:`cgpt.strategies.holds_full_model`); a run whose strategy
        shards the parameters says how to export from its checkpoint instead."""
        if not self.trainer.is_global_zero or self.trainer.global_step < (self.trainer.max_steps or 0):
            return
        from cgpt.strategies import holds_full_model

        if not holds_full_model(self.trainer.strategy):
            if self.export_hf is not None or (self.lora and self.adapters_path is not None):
                print("export skipped: this strategy shards the parameters, so rank 0 does not hold the model; "
                      "export the final checkpoint with `python train/convert.py to-hf <run folder> <out dir>` "
                      "(LoRA adapters are merged on the way)", flush=True)  # fmt: skip
            return
        if self.device.type == "cuda":
            print(f"peak GPU memory (rank 0): {torch.cuda.max_memory_allocated(self.device) / 1e9:.2f} GB", flush=True)
        from cgpt.lora import has_lora, merge_lora, save_adapters

        if has_lora(self.model) and self.adapters_path is not None:
            print(f"LoRA adapters: {save_adapters(self.model, self.adapters_path)}", flush=True)
        if self.export_hf is not None:
            import copy

            from cgpt.hf import to_hf

            plain = merge_lora(copy.deepcopy(self.model)) if has_lora(self.model) else self.model
            print(f"Hugging Face export: {to_hf(plain, self.export_hf)}", flush=True)

    def set_samples(self, examples: list[Example], max_new_tokens: int, path: str | os.PathLike | None) -> None:
        """Prompts to complete at each validation, and where to append the completions (JSONL)."""
        self.samples, self.sample_max_new_tokens = list(examples), max_new_tokens
        self.samples_path = Path(path) if path else None

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss over the batch's target tokens (what the base's training step logs)."""
        return sft_loss(self.model, batch)[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The base's step (it logs the micro-batch's per-token mean), returned as this micro-batch's
        share of the per-token mean over the optimizer step's whole global batch.

        Micro-batches hold different numbers of target tokens, so a mean of per-micro-batch means
        would weight a token by the size of the micro-batch it landed in, and the result would change
        with the number of ranks. Lightning divides each returned loss by the accumulation and the
        strategies average gradients over ranks; scaling the mean by ``n * accumulation * ranks /
        step_targets`` (``n`` this micro-batch's targets, ``step_targets`` the step's on all ranks,
        from :class:`cgpt.data.sft.SFTDataModule`) leaves the sum of every target token's loss over
        ``step_targets``.
        """
        step_targets = batch.pop("step_targets", None)
        mean = super().training_step(batch, batch_idx)
        if step_targets is None:  # a batch from elsewhere (a test): its own mean
            return mean
        n = (batch["targets"] != IGNORE_INDEX).sum()
        return mean * (n * self.trainer.accumulate_grad_batches * self.trainer.world_size / step_targets)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n = sft_loss(self.model, batch)
        # Weighted by target tokens: the epoch value is the per-token mean over the whole split.
        self._log_val_loss(loss, n)
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.samples and not self.trainer.sanity_checking:
            self.last_samples = self.generate_samples()
            if self.trainer.is_global_zero:
                for s in self.last_samples:
                    print(f"sample @ step {s['step']} (line {s['line']}): {s['prompt']!r} -> {s['output']!r} "
                          f"(reference {s['reference']!r})", flush=True)  # fmt: skip
                if self.samples_path is not None:
                    self.samples_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.samples_path, "a", encoding="utf-8") as f:
                        for s in self.last_samples:
                            f.write(json.dumps(s) + "\n")

    @torch.no_grad()
    def generate_samples(self) -> list[dict[str, Any]]:
        """Greedy completions of the sample prompts (run on every rank: sharded models need all)."""
        from cgpt.data.tokenizer import get_tokenizer
        from cgpt.generate import generate

        tok = get_tokenizer()
        prompts = [e.prompt_ids for e in self.samples]
        T = max(len(p) for p in prompts)
        n = min(self.sample_max_new_tokens, self.model_config.block_size - T)
        if n <= 0:
            return []
        idx = torch.full((len(prompts), T), tok.eos_id, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            idx[i, T - len(p) :] = torch.tensor(p, device=self.device)  # left padding
        out = generate(self.model, idx, n, temperature=0.0, eos_id=tok.eos_id, prompt_lengths=[len(p) for p in prompts])
        results = []
        for e, row in zip(self.samples, out[:, T:].tolist()):
            new = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
            results.append({"step": self.global_step, "line": e.line, "prompt": tok.decode(e.prompt_ids),
                            "output": tok.decode(new), "reference": e.reference})  # fmt: skip
        return results
