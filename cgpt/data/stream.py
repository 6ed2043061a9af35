"""Streaming reader of packed shards with a deterministic, resumable global order.

The order of one epoch is a pure function of (seed, epoch, shard list):

1. shards are permuted with the epoch's seed;
2. ranks own shards round-robin (rank r reads shards r, r + world, ...); with fewer shards than
   ranks every rank reads every shard and keeps every world-th sample instead;
3. each shard's samples are permuted with (seed, epoch, shard) — a full in-shard shuffle;
4. every rank serves the same number of micro-batches per epoch, ``min`` over ranks (from the
   per-shard counts in meta.json), so DDP never waits on a rank that ran out;
5. micro-batch ``j`` of a rank is assembled by dataloader worker ``j % num_workers``, and
   PyTorch's DataLoader returns workers' batches round-robin, so the batch sequence a rank sees
   does not depend on the number of workers.

Resuming is therefore exact: start at micro-batch ``k`` and the stream continues with exactly
the batches an uninterrupted run would have seen next, whatever the worker count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cgpt.data.shards import ShardFormatError, iter_tar_samples


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class PackedStream(IterableDataset):
    """Micro-batches ``{"tokens": LongTensor (B, seq_len + 1)}`` for one rank.

    Args:
        shards: the split's shards with their sample counts (from meta.json).
        sample_len: tokens per sample (``seq_len + 1``).
        micro_batch_size: samples per batch on this rank.
        rank, world_size: this process's data-parallel position.
        seed: the run seed; every epoch's order derives from it.
        shuffle: permute shards and samples (train) or keep file order (validation).
        infinite: run epoch after epoch (train) or stop after one (validation).
        start_batch: micro-batches of this rank already consumed (exact resume).
    """

    def __init__(
        self,
        shards: list[Shard],
        sample_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards = list(shards)
        self.sample_len = sample_len
        self.batch = micro_batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.start_batch = start_batch
        self.split_within_shards = len(self.shards) < world_size
        self.batches_per_epoch = self._samples_per_rank() // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{sum(s.samples for s in self.shards)} samples in {len(self.shards)} shards give rank {rank} "
                f"fewer than one micro-batch of {micro_batch_size} per epoch with {world_size} ranks: "
                "lower data.micro_batch_size or prepare more data"
            )

    # --- the epoch plan ----------------------------------------------------------------------
    def _samples_per_rank(self) -> int:
        if self.split_within_shards:
            return sum(s.samples for s in self.shards) // self.world
        # Worst case over epochs: the ``world`` largest-sum assignment can vary with the shard
        # permutation, so bound by the smallest sum any rank can get (its share of the smallest shards).
        counts = sorted(s.samples for s in self.shards)
        per_rank = len(counts) // self.world
        return sum(counts[:per_rank])

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's (shard index, sample indices in order) for ``epoch``."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = _rng(self.seed, epoch).permutation(len(self.shards))
        mine = order if self.split_within_shards else order[self.rank :: self.world]
        plan = []
        for s in mine:
            n = self.shards[s].samples
            idx = _rng(self.seed, epoch, int(s) + 1).permutation(n) if self.shuffle else np.arange(n)
            if self.split_within_shards:
                idx = idx[self.rank :: self.world]
            plan.append((int(s), idx))
        return plan

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        bad_shards = 0
        epoch, first = divmod(self.start_batch, self.batches_per_epoch)
        last_good: torch.Tensor | None = None
        while True:
            for j, rows, bad in self._epoch_batches(epoch, first, worker, workers):
                bad_shards += bad
                if j < 0:
                    continue
                if rows is None:
                    if self.infinite or last_good is None:
                        continue  # a corrupt shard: training simply moves on
                    rows = last_good  # keep every rank's validation batch count equal
                last_good = rows
                yield {
                    "tokens": rows,
                    "batch_index": torch.tensor(epoch * self.batches_per_epoch + j),
                    "bad_shards": torch.tensor(bad_shards),
                    "worker": torch.tensor(worker),
                }
            if not self.infinite:
                return
            epoch, first = epoch + 1, 0

    def _epoch_batches(
        self, epoch: int, first: int, worker: int, workers: int
    ) -> Iterator[tuple[int, torch.Tensor | None, int]]:
        """Yield (batch index, rows or None if a sample was unreadable, new bad shards)."""
        B, n_batches = self.batch, self.batches_per_epoch
        pos = 0  # position in this rank's sample sequence
        current: dict[int, list[np.ndarray | None]] = {}
        for shard_index, idx in self.epoch_plan(epoch):
            lo, hi = pos, pos + len(idx)
            pos = hi
            wanted = [j for j in range(lo // B, min(n_batches, -(-hi // B))) if j >= first and j % workers == worker]
            if not wanted:
                continue
            samples, bad = self._read_shard(shard_index)
            for j in wanted:
                rows = current.setdefault(j, [])
                for p in range(max(j * B, lo), min((j + 1) * B, hi)):
                    rows.append(None if samples is None else samples[idx[p - lo]])
                if len(rows) == B:
                    del current[j]
                    ok = all(r is not None for r in rows)
                    yield j, (torch.from_numpy(np.stack(rows).astype(np.int64)) if ok else None), bad
                    bad = 0
            if bad:
                yield -1, None, bad  # a corrupt shard none of whose batches completed here

    def _read_shard(self, s: int) -> tuple[np.ndarray | None, int]:
        import webdataset as wds

        shard = self.shards[s]
        try:
            with wds.gopen(shard.url, "rb") as stream:
                arr = np.stack(list(iter_tar_samples(stream, shard.url, self.sample_len)))
            if len(arr) != shard.samples:
                raise ShardFormatError(f"{shard.url}: {len(arr)} samples, meta.json says {shard.samples}")
            return arr, 0
        except (ShardFormatError, OSError, ValueError) as e:
            warnings.warn(f"skipping unreadable shard: {e}", stacklevel=2)
            return None, 1
