"""LightningDataModule over packed WebDataset shards: streaming, rank/worker-aware, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cgpt.data.shards import DatasetMeta
from cgpt.data.stream import PackedStream, Shard


class DataMismatchError(ValueError):
    """The prepared data does not fit the model or run (another tokenizer, vocab, seq_len)."""


class PackedDataModule(L.LightningDataModule):
    """Train/val loaders over the shards described by ``<data_dir>/meta.json``.

    Args:
        data_dir: folder with ``meta.json`` (and the shards, unless ``shard_url`` says otherwise).
        micro_batch_size: sequences per device per forward pass.
        num_workers: dataloader worker processes per rank (the batch order does not depend on it).
        seed: the run seed; the shuffle of every epoch derives from it.
        shard_url: optional template for where shards live, with ``{name}`` for the file name,
            e.g. ``pipe:aws s3 cp s3://bucket/pile/{name} -``. Any URL webdataset opens works.
        val_batches: cap on validation micro-batches per rank (``None``: the whole split).
    """

    def __init__(
        self,
        data_dir: str,
        micro_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shard_url: str | None = None,
        val_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shard_url = shard_url
        self.val_batches = val_batches
        self.meta = DatasetMeta.load(self.data_dir)
        self.consumed_micro_batches = 0  # of this rank; saved in checkpoints for exact resume
        self._bad_shards: dict[int, int] = {}
        self._resume_from: dict[str, Any] | None = None

    # --- checks ------------------------------------------------------------------------------
    def validate(self, seq_len: int | None, vocab_size: int, tokenizer: str = "gpt2") -> None:
        """Refuse data made for another run: raise :class:`DataMismatchError` saying what to do."""
        m, where = self.meta, Path(self.data_dir) / "meta.json"
        if m.tokenizer != tokenizer:
            raise DataMismatchError(f"{where}: shards use tokenizer {m.tokenizer!r}, the model expects {tokenizer!r}")
        if m.vocab_size > vocab_size:
            raise DataMismatchError(
                f"{where}: data vocab {m.vocab_size} exceeds the model's vocab_size {vocab_size}; "
                "use a model with a vocabulary that covers the tokenizer"
            )
        if seq_len is not None and m.seq_len != seq_len:
            raise DataMismatchError(
                f"{where}: shards hold sequences of {m.seq_len} tokens but the run asks for {seq_len}; "
                f"re-run data/prepare.py with --seq-len {seq_len} or set data.seq_len={m.seq_len}"
            )
        for split in ("train", "val"):
            if not self.meta.shards(split):
                raise DataMismatchError(f"{where}: the {split} split is empty; prepare more data")

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def bad_shards(self) -> int:
        """Unreadable shards skipped so far on this rank (summed over workers)."""
        return sum(self._bad_shards.values())

    # --- loaders -----------------------------------------------------------------------------
    def _shards(self, split: str) -> list[Shard]:
        out = []
        for s in self.meta.shards(split):
            url = self.shard_url.format(name=s["name"]) if self.shard_url else str(Path(self.data_dir) / s["name"])
            out.append(Shard(url, int(s["samples"])))
        return out

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: PackedStream) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the stream yields whole micro-batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        start = self._resume_batch(world)
        self.consumed_micro_batches = start
        stream = PackedStream(
            self._shards("train"), self.meta.sample_len, self.micro_batch_size, rank, world,
            seed=self.seed, shuffle=True, infinite=True, start_batch=start,
        )  # fmt: skip
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        stream = PackedStream(
            self._shards("val"), self.meta.sample_len, self.micro_batch_size, rank, world,
            seed=self.seed, shuffle=False, infinite=False,
        )  # fmt: skip
        if self.val_batches is not None:
            stream.batches_per_epoch = min(stream.batches_per_epoch, self.val_batches)
        return self._loader(stream)

    # --- the data position -------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if isinstance(batch, dict) and "batch_index" in batch and trainer is not None and trainer.training:
            self.consumed_micro_batches = int(batch["batch_index"]) + 1
            self._bad_shards[int(batch["worker"])] = int(batch["bad_shards"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world()
        return {
            "consumed_micro_batches": self.consumed_micro_batches,
            "micro_batch_size": self.micro_batch_size,
            "world_size": world,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = dict(state_dict)

    def _resume_batch(self, world: int) -> int:
        s = self._resume_from
        if not s:
            return 0
        if s["micro_batch_size"] == self.micro_batch_size and s["world_size"] == world and s["seed"] == self.seed:
            return int(s["consumed_micro_batches"])
        # Another layout: keep the global sample position (exact order is not preserved).
        samples = int(s["consumed_micro_batches"]) * s["micro_batch_size"] * s["world_size"]
        return samples // (self.micro_batch_size * world)
