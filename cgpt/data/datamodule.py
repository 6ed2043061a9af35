"""LightningDataModule over packed WebDataset shards: streaming, rank/worker-aware, resumable."""

from __future__ import annotations

import os
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cgpt.data.shards import DatasetMeta
from cgpt.data.stream import PackedStream, Shard

TRACE_ENV = "CGPT_DATA_TRACE"  # file prefix: each rank appends the training batches it consumes


class PackedLoader(DataLoader):
    """A DataLoader that drops the placeholders of batches that needed an unreadable shard
    (``tokens`` None) after handing them to ``on_skip``, in the training process, so the order
    of the remaining batches is still independent of the number of workers."""

    on_skip: Callable[[dict[str, Any]], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, dict) and batch.get("tokens", ()) is None:
                if self.on_skip is not None:
                    self.on_skip(batch)
                continue
            yield batch


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
        mix_shards: training shards shuffled together, so each micro-batch mixes this many
            shards (each dataloader worker holds as many in memory).
        val_sources: more prepared folders, ``(name, dir)``, whose validation splits are scored
            separately at each validation (``val/loss/<name>``); validation then has one loader
            per folder, ``data_dir``'s first.
    """

    def __init__(
        self,
        data_dir: str,
        micro_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shard_url: str | None = None,
        val_batches: int | None = None,
        mix_shards: int = 4,
        val_sources: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shard_url = shard_url
        self.val_batches = val_batches
        self.mix_shards = mix_shards
        self.meta = DatasetMeta.load(self.data_dir)
        self.val_sources = [(str(name), str(folder)) for name, folder in val_sources]
        self._val_metas = [self.meta] + [DatasetMeta.load(folder) for _, folder in self.val_sources]
        self.consumed_micro_batches = 0  # of this rank; saved in checkpoints for exact resume
        self.bad_shard_names: set[str] = set()  # unreadable shards skipped (also saved in checkpoints)
        self._resume_from: dict[str, Any] | None = None

    # --- checks ------------------------------------------------------------------------------
    def validate(
        self, seq_len: int | None, vocab_size: int, tokenizer: str = "gpt2", block_size: int | None = None
    ) -> None:
        """Refuse data that cannot feed this run, before training: raise :class:`DataMismatchError`
        saying what to fix (another tokenizer, vocab, sequence length, empty split, missing shards).

        Args:
            seq_len: the sequence length the run asks for (None: accept the data's).
            vocab_size: the model's vocabulary size; every token id of the data must fit.
            tokenizer: the tokenizer the model was built for.
            block_size: the model's context length; the data's sequences must fit in it.
        """
        m, where = self.meta, Path(self.data_dir) / "meta.json"
        if m.tokenizer != tokenizer:
            raise DataMismatchError(
                f"{where}: shards use tokenizer {m.tokenizer!r}, the model expects {tokenizer!r}; "
                "re-run data/prepare.py for this model"
            )
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
        if block_size is not None and m.seq_len > block_size:
            raise DataMismatchError(
                f"{where}: shards hold sequences of {m.seq_len} tokens, longer than the model's context of "
                f"{block_size}; re-run data/prepare.py with --seq-len {block_size} (or less)"
            )
        for split in ("train", "val"):
            shards = self.meta.shards(split)
            if not shards or not sum(int(s["samples"]) for s in shards):
                raise DataMismatchError(f"{where}: the {split} split is empty; prepare more data")
            if self.shard_url is None:
                missing = [s["name"] for s in shards if not (Path(self.data_dir) / s["name"]).is_file()]
                if len(missing) == len(shards):
                    raise DataMismatchError(
                        f"{where}: none of the {len(shards)} {split} shards is in {self.data_dir} (e.g. "
                        f"{missing[0]}); copy them there or set data.shard_url to where they are"
                    )
                if missing:
                    warnings.warn(
                        f"{len(missing)} of {len(shards)} {split} shards are missing from {self.data_dir} "
                        f"(e.g. {missing[0]}); they will be skipped and counted as bad shards",
                        stacklevel=2,
                    )
        for name, folder in self.val_sources:
            m = DatasetMeta.load(folder)
            if (m.tokenizer, m.seq_len) != (self.meta.tokenizer, self.meta.seq_len):
                raise DataMismatchError(
                    f"validation source {name!r} ({folder}): tokenizer {m.tokenizer!r} and seq_len {m.seq_len} differ "
                    f"from the training data's ({self.meta.tokenizer!r}, {self.meta.seq_len}); prepare it the same way"
                )
            if not sum(int(s["samples"]) for s in m.shards("val")):
                raise DataMismatchError(f"validation source {name!r} ({folder}): the val split is empty")

    @property
    def val_names(self) -> list[str | None]:
        """What each validation loader scores: None for ``data_dir`` (``val/loss``), else a name."""
        return [None] + [name for name, _ in self.val_sources]

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def bad_shards(self) -> int:
        """Distinct unreadable shards this rank has skipped so far (over all its workers and the
        runs this one resumes)."""
        return len(self.bad_shard_names)

    def bad_shards_all_ranks(self) -> int:
        """Distinct unreadable shards skipped by any rank. A collective under DDP: call it on every
        rank (RunSummary.write does)."""
        import torch.distributed as dist

        names = set(self.bad_shard_names)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(names))
            names = {n for part in gathered for n in part}
        return len(names)

    # --- loaders -----------------------------------------------------------------------------
    def _shards(self, split: str, source: int = 0) -> list[Shard]:
        """The shards of ``split`` of ``data_dir`` (source 0) or of validation source ``source``
        (read from its own folder: ``shard_url`` is ``data_dir``'s)."""
        if source:
            folder, meta = self.val_sources[source - 1][1], self._val_metas[source]
            return [Shard(str(Path(folder) / s["name"]), int(s["samples"]), s.get("crc32")) for s in meta.shards(split)]
        out = []
        for s in self.meta.shards(split):
            url = self.shard_url.format(name=s["name"]) if self.shard_url else str(Path(self.data_dir) / s["name"])
            out.append(Shard(url, int(s["samples"]), s.get("crc32")))
        return out

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: PackedStream, split: str, source: int = 0) -> DataLoader:
        loader = PackedLoader(
            dataset,
            batch_size=None,  # the stream yields whole micro-batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        loader.on_skip = lambda batch: self._note_bad_shards(batch.get("bad_shards"), split, source)
        return loader

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        start = self._resume_batch(world)
        self.consumed_micro_batches = start
        stream = PackedStream(
            self._shards("train"), self.meta.sample_len, self.micro_batch_size, rank, world,
            seed=self.seed, shuffle=True, infinite=True, start_batch=start, mix_shards=self.mix_shards,
        )  # fmt: skip
        return self._loader(stream, "train")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader over ``data_dir``'s val split; with ``val_sources``, one loader per folder."""
        rank, world = self._rank_world()
        loaders = []
        for source in range(len(self._val_metas)):
            stream = PackedStream(
                self._shards("val", source), self.meta.sample_len, self.micro_batch_size, rank, world,
                seed=self.seed, shuffle=False, infinite=False, max_batches=self.val_batches,
            )  # fmt: skip
            loaders.append(self._loader(stream, "val", source))
        return loaders if self.val_sources else loaders[0]

    # --- the data position -------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        trainer = getattr(self, "trainer", None)
        split = "train" if trainer is None or trainer.training else "val"
        self._note_bad_shards(batch.pop("bad_shards", None), split, dataloader_idx if split == "val" else 0)
        index = batch.pop("batch_index", None)
        if index is not None and trainer is not None and trainer.training:
            self.consumed_micro_batches = int(index) + 1
            if os.environ.get(TRACE_ENV):
                self._trace(int(index), batch["tokens"])
        return batch

    def _note_bad_shards(self, ids: Any, split: str, source: int = 0) -> None:
        """Record (and report once) the shards of ``split`` (of validation source ``source``) a worker
        found unreadable."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids or ())
        if not ids:
            return
        shards = self._val_metas[source].shards(split)
        prefix = f"{self.val_sources[source - 1][0]}/" if source else ""  # shard names repeat across folders
        new = {prefix + shards[int(i)]["name"] for i in ids} - self.bad_shard_names
        if new:
            self.bad_shard_names |= new
            rank = self._rank_world()[0]
            print(
                f"data: skipped {len(new)} unreadable shard(s) {sorted(new)}; {self.bad_shards} so far (rank {rank})",
                file=sys.stderr,
                flush=True,
            )

    def _trace(self, index: int, tokens: torch.Tensor) -> None:
        """Append ``rank batch_index crc32(tokens)`` to the file named by ``CGPT_DATA_TRACE``."""
        rank = self._rank_world()[0]
        digest = zlib.crc32(tokens.cpu().numpy().tobytes())
        with open(f"{os.environ[TRACE_ENV]}.rank{rank}", "a") as f:
            f.write(f"{index} {digest}\n")

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world()
        return {
            "consumed_micro_batches": self.consumed_micro_batches,
            "micro_batch_size": self.micro_batch_size,
            "world_size": world,
            "seed": self.seed,
            "mix_shards": self.mix_shards,
            "bad_shard_names": sorted(self.bad_shard_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = dict(state_dict)
        self.bad_shard_names |= set(state_dict.get("bad_shard_names", ()))

    def _resume_batch(self, world: int) -> int:
        s = self._resume_from
        if not s:
            return 0
        layout = (self.micro_batch_size, world, self.seed, self.mix_shards)
        saved = (s["micro_batch_size"], s["world_size"], s["seed"], s.get("mix_shards", self.mix_shards))
        if saved == layout:
            return int(s["consumed_micro_batches"])
        # Another layout: keep the global sample position; the order from here is another one.
        samples = int(s["consumed_micro_batches"]) * s["micro_batch_size"] * s["world_size"]
        warnings.warn(
            "resuming with another (micro_batch_size, world_size, seed, mix_shards) than the checkpoint "
            f"({saved} -> {layout}): the data continues after the same number of samples, in another order",
            stacklevel=2,
        )
        return samples // (self.micro_batch_size * world)
