"""Streaming reader of packed shards with a deterministic, resumable global order.

The order of one epoch is a pure function of (seed, epoch, shard list, rank, world size):

1. shards are permuted with the epoch's seed (validation keeps file order);
2. with ``n`` shards and ``world`` ranks, the first ``world * (n // world)`` shards of that order
   are dealt to ranks round-robin, whole; the ``n % world`` left over are split *within* the
   shard (rank ``r`` keeps every ``world``-th sample from ``r``), so no rank idles and nothing is
   lost. Fewer shards than ranks is the case ``n // world == 0``: every rank reads every shard.
   When splitting the leftovers would more than double the shard reads of an epoch (many ranks,
   ``n % world`` large), they are skipped for that epoch instead (different shards each epoch);
3. a rank's shards are taken ``mix_shards`` at a time (leftover shards likewise) and the samples
   of each such group are permuted together with (seed, epoch, group): every micro-batch mixes
   several shards, and within a group the shuffle is complete (no buffer to fill or drain);
4. every rank serves the same number of micro-batches in an epoch: what the rank with the fewest
   samples in that epoch's plan can fill, known to all ranks from the per-shard counts in
   meta.json, so DDP never waits on a rank that ran out. The samples past it on the other ranks
   (at most about one shard's worth per rank, different ones each epoch) and the last partial
   micro-batch are the documented drop;
5. the ``i``-th micro-batch a rank serves (counting from where it started) is assembled by
   dataloader worker ``i % num_workers``, and
   PyTorch's DataLoader returns workers' batches round-robin, so the batch sequence a rank sees
   does not depend on the number of workers. (The price: each worker reads every shard of its
   rank and keeps its own batches' samples; one worker is meant to suffice, see bench/.)

No sample is served twice within an epoch across ranks x workers, and together they cover it.
Validation reads in file order (no shuffle, no mixing).
Resuming is exact: start at micro-batch ``k`` and the stream continues with exactly the batches
an uninterrupted run would have seen next, whatever the worker count; shards holding only
already-consumed batches are not even read.

Unreadable shards (missing, truncated, corrupt, checksum mismatch) are skipped with a warning;
their ids travel with the next batch (``bad_shards``) so the data module can count them. A
training batch that needed a bad shard comes as a placeholder with ``tokens=None``, which the
data module's loader drops in the training process (dropping it in the worker would break the
round-robin order); a validation batch is replaced by a readable one so every rank runs the
same number of validation steps.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cgpt.data.shards import ShardFormatError, read_shard

REMOTE_ATTEMPTS = 3  # tries for a shard behind a URL or pipe before it counts as bad
RETRY_DELAY_S = 1.0  # seconds before the second try (doubles, triples, ...)


@dataclass(frozen=True)
class Shard:
    """One shard: where it is, its sample count and (optionally) its CRC-32 from meta.json."""

    url: str
    samples: int
    crc32: int | None = None


class DataReadError(RuntimeError):
    """No shard a worker needed could be read: the data location is wrong or the data is gone."""


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class PackedStream(IterableDataset):
    """Micro-batches ``{"tokens": LongTensor (B, seq_len + 1), "batch_index": int, "bad_shards": [int]}``.

    ``batch_index`` counts this rank's micro-batches from the start of training (the resume
    position); ``bad_shards`` lists shards found unreadable since the previous batch; ``tokens``
    is None for a training batch that needed an unreadable shard (drop it: see
    :class:`cgpt.data.datamodule.PackedLoader`).

    Args:
        shards: the split's shards with their sample counts (from meta.json).
        sample_len: tokens per sample (``seq_len + 1``).
        micro_batch_size: samples per batch on this rank.
        rank, world_size: this process's data-parallel position.
        seed: the run seed; every epoch's order derives from it.
        shuffle: permute shards and samples (train) or keep file order (validation).
        infinite: run epoch after epoch (train) or stop after one (validation).
        start_batch: micro-batches of this rank already consumed (exact resume).
        max_batches: cap on micro-batches per epoch (e.g. a quick validation).
        mix_shards: shards shuffled together (each micro-batch mixes samples of this many
            shards); a worker holds that many shards in memory.
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
        max_batches: int | None = None,
        mix_shards: int = 4,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if mix_shards <= 0:
            raise ValueError(f"mix_shards must be positive, got {mix_shards}")
        self.shards = list(shards)
        self.sample_len = sample_len
        self.batch = micro_batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.start_batch = start_batch
        n = len(self.shards)
        self.whole_per_rank = n // world_size
        leftover = n % world_size
        # Splitting a leftover shard makes every rank read it: allow it while the epoch's shard
        # reads at most double (always when there are fewer shards than ranks).
        self.split_leftovers = self.whole_per_rank == 0 or leftover * world_size <= n
        self.max_batches = max_batches
        self.mix = mix_shards if shuffle else 1
        self._counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self._epoch_batches_cache: dict[int, int] = {}
        if self.batches_in_epoch(0) == 0:
            raise ValueError(
                f"{sum(s.samples for s in self.shards)} samples in {n} shards give rank {rank} fewer than one "
                f"micro-batch of {micro_batch_size} per epoch with {world_size} ranks: lower "
                "data.micro_batch_size, use fewer devices, or prepare more data"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of the first epoch (later epochs may differ by a few; see batches_in_epoch)."""
        return self.batches_in_epoch(0)

    # --- the epoch plan ----------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.shards)
        return _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches every rank serves in ``epoch``: what the rank with the fewest samples in
        that epoch's plan can fill (the same number on all ranks, so DDP never waits)."""
        key = epoch if self.shuffle else 0
        if key not in self._epoch_batches_cache:
            counts, world = self._counts[self._order(key)], self.world
            whole = world * self.whole_per_rank
            per_rank = np.array([counts[r:whole:world].sum() for r in range(world)])
            if self.split_leftovers:
                for g in range(whole, len(counts), self.mix):  # rank r keeps positions r, r + world, ...
                    c = counts[g : g + self.mix].sum()
                    per_rank += np.maximum(0, (c - np.arange(world) + world - 1) // world)
            n = int(per_rank.min()) // self.batch
            self._epoch_batches_cache[key] = n if self.max_batches is None else min(n, self.max_batches)
        return self._epoch_batches_cache[key]

    def locate(self, batch: int) -> tuple[int, int, int]:
        """(epoch, batch within it, batches of earlier epochs) of this rank's ``batch``-th micro-batch."""
        epoch, before = 0, 0
        while batch - before >= self.batches_in_epoch(epoch):
            before += self.batches_in_epoch(epoch)
            epoch += 1
        return epoch, batch - before, before

    def epoch_plan(self, epoch: int) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """This rank's units for ``epoch``: (shard indices, sample positions in the concatenation
        of those shards, in serving order)."""
        return [(unit, self._indices(epoch, unit, split)) for unit, _, split in self._units(epoch)]

    def _units(self, epoch: int) -> Iterator[tuple[tuple[int, ...], int, bool]]:
        """This rank's (shards read together, samples it takes from them, split among ranks?).
        Cheap: the permutations are drawn only for the units a worker reads (``_indices``)."""
        world, order = self.world, self._order(epoch).tolist()
        whole = world * self.whole_per_rank
        mine = order[self.rank : whole : world]
        rest = order[whole:] if self.split_leftovers else []
        for group, split in ((mine, False), (rest, True)):
            for g in range(0, len(group), self.mix):
                unit = tuple(group[g : g + self.mix])
                total = int(self._counts[list(unit)].sum())
                yield unit, (len(range(self.rank, total, world)) if split else total), split

    def _indices(self, epoch: int, unit: tuple[int, ...], split: bool) -> np.ndarray:
        total = int(self._counts[list(unit)].sum())
        idx = _rng(self.seed, epoch, unit[0] + 1).permutation(total) if self.shuffle else np.arange(total)
        return idx[self.rank :: self.world] if split else idx

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, first, before = self.locate(self.start_batch)
        spare: tuple[torch.Tensor, torch.Tensor] | None = None  # a readable validation batch (rows, keys)
        owed: list[int] = []  # validation batches still to serve once a readable one turns up
        bad_ids: list[int] = []
        while True:
            reads = [0, 0]  # shards read this epoch, of which unreadable
            for j, rows, bad, keys in self._epoch_batches(epoch, first, before, worker, workers, reads):
                j += before if j >= 0 else 0
                bad_ids.extend(bad)
                if j < 0:
                    continue
                if rows is None:  # training: a placeholder (keeps the workers' round-robin intact);
                    if self.infinite:  # validation: a readable stand-in (keeps the step count)
                        yield self._item(None, None, j, bad_ids)
                    elif spare is None:
                        owed.append(j)
                        continue
                    else:
                        yield self._item(*spare, j, bad_ids)
                    bad_ids = []
                    continue
                for k in [*owed, j]:
                    yield self._item(rows, keys, k, bad_ids)
                    bad_ids = []
                spare, owed = (rows, keys), []
            if reads[0] and reads[0] == reads[1]:
                raise DataReadError(
                    f"rank {self.rank} worker {worker}: none of the {reads[0]} shards it needed in epoch {epoch} "
                    f"could be read (e.g. {self.shards[0].url}). Check data.dir / data.shard_url."
                )
            if not self.infinite:
                return
            epoch, first, before = epoch + 1, 0, before + self.batches_in_epoch(epoch)

    def _item(self, rows: torch.Tensor | None, keys: torch.Tensor | None, j: int, bad_ids: list[int]) -> dict[str, Any]:
        # Plain ints travel from worker processes almost for free; each tensor costs a shared-memory
        # segment, so only the tokens and the sample keys are one. A sample's key is
        # shard index * 2**32 + its index within the shard: stable across world sizes and resumes.
        return {"tokens": rows, "sample_keys": keys, "batch_index": j, "bad_shards": list(bad_ids)}

    def _epoch_batches(
        self, epoch: int, first: int, before: int, worker: int, workers: int, reads: list[int]
    ) -> Iterator[tuple[int, torch.Tensor | None, list[int], torch.Tensor | None]]:
        """Yield (batch index in the epoch or -1, rows or None if a sample was unreadable, newly bad
        shards, sample keys) for the batches of ``worker``: the (start_batch + worker + i * workers)-th ones."""
        skew = before - self.start_batch - worker
        B, n_batches = self.batch, self.batches_in_epoch(epoch)
        pos = 0  # position in this rank's sample sequence
        parts: dict[int, list[np.ndarray | None]] = {}  # pieces of batches that span shards
        keys: dict[int, list[np.ndarray]] = {}
        filled: dict[int, int] = {}
        for unit, count, split in self._units(epoch):
            lo, hi = pos, pos + count
            pos = hi
            wanted = [j for j in range(max(first, lo // B), min(n_batches, -(-hi // B))) if (j + skew) % workers == 0]
            if not wanted:
                if lo >= n_batches * B:
                    break
                continue
            idx = self._indices(epoch, unit, split)
            take, bad = self._read_unit(unit)
            reads[0] += len(unit)
            reads[1] += len(bad)
            for j in wanted:
                a, b = max(j * B, lo), min((j + 1) * B, hi)
                parts.setdefault(j, []).append(take(idx[a - lo : b - lo]))
                keys.setdefault(j, []).append(self._sample_keys(unit, idx[a - lo : b - lo]))
                filled[j] = filled.get(j, 0) + b - a
                if filled[j] == B:
                    pieces = parts.pop(j)
                    del filled[j]
                    ok = all(p is not None for p in pieces)
                    rows = torch.from_numpy(np.concatenate(pieces).astype(np.int64)) if ok else None
                    yield j, rows, bad, torch.from_numpy(np.concatenate(keys.pop(j)))
                    bad = []
            if bad:
                yield -1, None, bad, None  # bad shards none of whose batches completed here

    def _sample_keys(self, unit: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
        """The keys (shard index * 2**32 + index within the shard) of positions ``rows`` of the unit."""
        offsets = np.cumsum([0] + [self.shards[s].samples for s in unit])
        which = np.searchsorted(offsets, rows, side="right") - 1
        return np.asarray(unit, dtype=np.int64)[which] * 2**32 + (rows - offsets[which]).astype(np.int64)

    def _read_unit(self, unit: tuple[int, ...]) -> tuple[Callable[[np.ndarray], np.ndarray | None], list[int]]:
        """Read a unit's shards; return ``take(rows)`` (the samples at those positions of the
        shards' concatenation, None if one is unreadable) and the unreadable shards. The shards
        are not concatenated: a worker holds each once."""
        arrays = [self._read_shard(s) for s in unit]
        bad = [s for s, arr in zip(unit, arrays, strict=True) if arr is None]
        if len(arrays) == 1:
            return (lambda rows: None if arrays[0] is None else arrays[0][rows]), bad
        offsets = np.cumsum([0] + [self.shards[s].samples for s in unit])

        def take(rows: np.ndarray) -> np.ndarray | None:
            which = np.searchsorted(offsets, rows, side="right") - 1
            out = np.empty((len(rows), self.sample_len), dtype=np.uint16)
            for k in np.unique(which).tolist():
                if arrays[k] is None:
                    return None
                here = which == k
                out[here] = arrays[k][rows[here] - offsets[k]]
            return out

        return take, bad

    def _read_shard(self, s: int) -> np.ndarray | None:
        """The shard's samples, or None (with a warning) when it cannot be read. Remote shards
        (URLs, ``pipe:``) get ``REMOTE_ATTEMPTS`` tries, as network reads fail transiently."""
        shard = self.shards[s]
        remote = "://" in shard.url or shard.url.startswith("pipe:")
        attempts = REMOTE_ATTEMPTS if remote else 1
        for attempt in range(1, attempts + 1):
            try:
                arr = read_shard(shard.url, self.sample_len, shard.samples, shard.crc32)
                if len(arr) != shard.samples:
                    raise ShardFormatError(f"{shard.url}: {len(arr)} samples, meta.json says {shard.samples}")
                return arr
            except (ShardFormatError, OSError, ValueError) as e:
                if attempt < attempts:
                    time.sleep(RETRY_DELAY_S * attempt)
                    continue
                tries = f" after {attempts} tries" if attempts > 1 else ""
                warnings.warn(f"skipping unreadable shard{tries}: {e}", stacklevel=2)
        return None
