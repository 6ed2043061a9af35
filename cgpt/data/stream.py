"""Streaming reader of packed shards with one global sample order, whatever the world size.

**The order** (:class:`SampleOrder`) is a pure function of (seed, epoch, shard list, partitions,
mix_shards, global batch ``G``); it does not depend on the world size or the worker count:

1. each epoch the shards are permuted with (seed, epoch) and their samples concatenated
   (validation keeps file order);
2. that sequence is cut into ``P`` contiguous *canonical partitions* (``data.partitions``,
   clipped to ``G``). Global-batch slot ``j`` belongs to partition ``j * P // G``, so partition
   ``p`` owns a fixed number ``c_p`` of slots (``G // P`` or one more) and its length is
   proportional to ``c_p``;
3. each partition is cut into *units* of about ``mix_shards`` shards' worth of samples; the
   samples of a unit are permuted with (seed, epoch, unit) and units are served in order;
4. global batch ``b`` of the epoch takes, in partition ``p``'s slots, that partition's positions
   ``[b * c_p, (b + 1) * c_p)``. An epoch ends when the first partition runs out: the drop is the
   partitions' leftover tails, fewer than ``G + P`` samples an epoch.

**Ranks and workers** only choose which part of that sequence they serve. Rank ``r`` of ``W``
takes slots ``[r G/W, (r+1) G/W)`` of every global batch and cuts them, in order, into
``A = G / (W B)`` micro-batches of ``B``: its ``i``-th micro-batch is global batch ``i // A``.
So global batch ``b`` is the same samples at any ``W`` (only its split over ranks and accumulation
steps changes), and a rank reads only its ``P / W`` partitions (+1 at a boundary): about ``1/W``
of the bytes. Micro-batch ``i`` is assembled by dataloader worker ``i % num_workers`` (counted
from where the stream started) and PyTorch returns workers' batches round-robin, so the sequence
does not depend on the worker count. A worker reads a shard only when one of its own micro-batches
needs a sample of it, and keeps it while the unit holding it is current. When ``num_workers``
divides ``A``, worker ``w`` always serves the same slots of a global batch, so it reads only its
``1/num_workers`` of the rank's partitions; otherwise workers cycle through all of the rank's slots
and each reads most of the rank's shards (docs/design/data-pipeline.md measures both).

Every training batch carries ``sample_keys``: ``shard index * 2**32 + sample index`` in
meta.json's shard list, stable under any reshuffle (:func:`sample_key`).

Resuming is exact: the data position is one global number (global batches consumed); a stream
started at micro-batch ``k`` serves what an uninterrupted one would have served from ``k``.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cgpt.data.shards import ShardFormatError, read_shard

REMOTE_ATTEMPTS = 3  # tries for a shard behind a URL or pipe before it counts as bad
RETRY_DELAY_S = 1.0  # seconds before the second try (doubles, triples, ...)
DEFAULT_PARTITIONS = 16  # canonical partitions of the training order (data.partitions)
KEY_SHIFT = 32  # sample key = shard index << KEY_SHIFT | sample index within the shard


@dataclass(frozen=True)
class Shard:
    """One shard: where it is, its sample count and (optionally) its CRC-32 from meta.json."""

    url: str
    samples: int
    crc32: int | None = None


class DataReadError(RuntimeError):
    """No shard a worker needed could be read: the data location is wrong or the data is gone."""


def sample_key(shard: np.ndarray | int, index: np.ndarray | int) -> np.ndarray | int:
    """The stable id of sample ``index`` of shard ``shard`` (positions in meta.json's list)."""
    return (np.asarray(shard, dtype=np.int64) << KEY_SHIFT) | np.asarray(index, dtype=np.int64)


def split_key(key: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, sample index) of sample keys."""
    key = np.asarray(key, dtype=np.int64)
    return key >> KEY_SHIFT, key & ((1 << KEY_SHIFT) - 1)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class SampleOrder:
    """The sample sequence of one source over all epochs, ``width`` positions per row.

    Position ``q`` is row ``q // width`` (a global batch of the plain, one-source order), column
    ``q % width`` (a slot). A consumer that needs a varying number of samples per global batch
    (a mixture) reads any contiguous range of positions with :meth:`keys`.

    Args:
        counts: samples per shard, in meta.json's order.
        width: positions per row (the global batch ``G`` for a single source).
        partitions: canonical partitions (clipped to ``width``).
        mix_shards: samples are permuted within units of about this many shards' worth.
        seed: the run seed.
        shuffle: permute shards and units per epoch (False: file order, for validation).
    """

    def __init__(
        self,
        counts: Sequence[int],
        width: int,
        partitions: int = DEFAULT_PARTITIONS,
        mix_shards: int = 4,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if width <= 0 or partitions <= 0 or mix_shards <= 0:
            raise ValueError(f"width, partitions and mix_shards must be positive: {width}, {partitions}, {mix_shards}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.width = width
        self.partitions = P = min(partitions, width)
        self.seed = seed
        self.shuffle = shuffle
        self.col_partition = np.arange(width) * P // width  # slot -> partition
        self.first_col = -(-np.arange(P + 1) * width // P)  # partition p owns slots [first_col[p], first_col[p+1])
        self.cols = np.diff(self.first_col)  # c_p
        self.bounds = self.total * self.first_col // width  # partition p: [bounds[p], bounds[p+1]) of the epoch
        lengths = np.diff(self.bounds)
        self.rows_per_epoch = int((lengths // self.cols).min())
        # Units: about mix_shards shards' worth of a partition's samples, permuted together.
        target = max(1.0, mix_shards * self.total / len(self.counts)) if shuffle else float("inf")
        units = [self.bounds[:1]]
        for p in range(P):
            n = max(1, round(lengths[p] / target)) if lengths[p] else 1
            units.append(self.bounds[p] + lengths[p] * np.arange(1, n + 1) // n)
        self.unit_bounds = np.unique(np.concatenate(units))  # every unit lies within one partition
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def per_epoch(self) -> int:
        """Positions served per epoch (``rows_per_epoch * width``); the rest is the epoch's drop."""
        return self.rows_per_epoch * self.width

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start of each shard in the concatenation) of ``epoch``."""
        if epoch not in self._epoch_cache:
            n = len(self.counts)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            self._epoch_cache = {epoch: (order, np.concatenate([[0], np.cumsum(self.counts[order])]))}
        return self._epoch_cache[epoch]

    def _perm(self, epoch: int, unit: int) -> np.ndarray:
        key = (epoch, unit)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * self.partitions + 8:  # units are used in order: drop the oldest
                del self._perm_cache[next(iter(self._perm_cache))]
            size = int(self.unit_bounds[unit + 1] - self.unit_bounds[unit])
            self._perm_cache[key] = _rng(self.seed, epoch, unit, 1).permutation(size)
        return self._perm_cache[key]

    def locate(self, start: int, stop: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, unit, shard, sample index in the shard) of positions ``[start, stop)``, which
        must lie in one epoch."""
        q = np.arange(start, stop, dtype=np.int64)
        epoch = start // self.per_epoch
        if stop > start and (stop - 1) // self.per_epoch != epoch:
            raise ValueError(f"positions {start}..{stop} cross an epoch boundary")
        row, col = np.divmod(q - epoch * self.per_epoch, self.width)
        p = self.col_partition[col]
        at = self.bounds[p] + row * self.cols[p] + col - self.first_col[p]  # position in the epoch's sequence
        unit = np.searchsorted(self.unit_bounds, at, side="right") - 1
        if self.shuffle:
            offset = at - self.unit_bounds[unit]
            for u in np.unique(unit).tolist():
                here = unit == u
                offset[here] = self._perm(epoch, u)[offset[here]]
            at = self.unit_bounds[unit] + offset
        order, starts = self._epoch(epoch)
        slot = np.searchsorted(starts, at, side="right") - 1
        return epoch, unit, order[slot], at - starts[slot]

    def keys(self, start: int, stop: int) -> np.ndarray:
        """Sample keys of positions ``[start, stop)`` (may span epochs)."""
        parts = []
        while start < stop:
            end = min(stop, (start // self.per_epoch + 1) * self.per_epoch)
            _, _, shard, index = self.locate(start, end)
            parts.append(sample_key(shard, index))
            start = end
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def unit_shards(self, epoch: int, unit: int) -> np.ndarray:
        """Shards holding samples of ``unit`` in ``epoch``."""
        order, starts = self._epoch(epoch)
        lo = np.searchsorted(starts, self.unit_bounds[unit], side="right") - 1
        hi = np.searchsorted(starts, self.unit_bounds[unit + 1] - 1, side="right") - 1
        return order[lo : hi + 1]


class PackedStream(IterableDataset):
    """Micro-batches ``{"tokens": LongTensor (B, seq_len + 1), "sample_keys": [int] * B,
    "batch_index": int, "global_batch": int, "bad_shards": [int]}`` (the data module's loader
    turns ``sample_keys`` into an int64 tensor of shape (B,)).

    ``batch_index`` counts this rank's micro-batches from the start of training and
    ``global_batch`` is the optimizer step's batch it belongs to; ``bad_shards`` lists shards
    found unreadable since the previous batch; ``tokens`` is None for a training batch that needed
    an unreadable shard (drop it: see :class:`cgpt.data.datamodule.PackedLoader`).

    Args:
        shards: the split's shards with their sample counts (from meta.json).
        sample_len: tokens per sample (``seq_len + 1``).
        micro_batch_size: samples per batch on this rank.
        rank, world_size: this process's data-parallel position.
        seed: the run seed; every epoch's order derives from it.
        shuffle: the training order (True) or file order (validation; partitions = ranks, so each
            rank reads one contiguous ``1/world_size`` of the split).
        infinite: run epoch after epoch (train) or stop after one (validation).
        start_batch: micro-batches of this rank already consumed (exact resume; a multiple of the
            accumulation steps when resuming at another world size).
        max_batches: cap on micro-batches per epoch (e.g. a quick validation).
        mix_shards: samples are permuted within units of about this many shards' worth.
        global_batch_size: samples per optimizer step over all ranks (default: one micro-batch
            per rank); must be a multiple of ``micro_batch_size * world_size``.
        partitions: canonical partitions of the order (clipped to the global batch).
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
        global_batch_size: int | None = None,
        partitions: int = DEFAULT_PARTITIONS,
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
        G = global_batch_size or micro_batch_size * world_size
        if G % (micro_batch_size * world_size):
            raise ValueError(
                f"global batch {G} is not a multiple of micro_batch_size {micro_batch_size} x world size {world_size}"
            )
        self.shards = list(shards)
        self.sample_len = sample_len
        self.batch = micro_batch_size
        self.rank = rank
        self.world = world_size
        self.global_batch = G
        self.accumulation = G // (micro_batch_size * world_size)
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.start_batch = start_batch
        self.max_batches = max_batches
        self.mix = mix_shards
        self.order = SampleOrder(
            [s.samples for s in self.shards], G, partitions if shuffle else world_size, mix_shards, seed, shuffle
        )
        self.shards_read: list[int] = []  # shards this process read, in order (bench/ and tests count them)
        if self.order.rows_per_epoch == 0:
            raise ValueError(
                f"{self.order.total} samples in {len(self.shards)} shards give fewer than one global batch of "
                f"{G} per epoch (rank {rank} of {world_size}, micro-batch {micro_batch_size}): lower "
                "data.micro_batch_size or data.global_batch_size, or prepare more data"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank serves per epoch (the same on every rank)."""
        n = self.order.rows_per_epoch * self.accumulation
        return n if self.max_batches is None else min(n, self.max_batches)

    def positions(self, batch: int) -> tuple[int, int]:
        """The order's positions ``[start, stop)`` of this rank's ``batch``-th micro-batch."""
        g, m = divmod(batch, self.accumulation)
        if not self.infinite:  # one epoch, maybe capped: micro-batch i of the epoch
            g, m = divmod(batch % self.batches_per_epoch, self.accumulation)
        start = g * self.global_batch + self.rank * (self.global_batch // self.world) + m * self.batch
        return start, start + self.batch

    def keys(self, batch: int) -> np.ndarray:
        """Sample keys of this rank's ``batch``-th micro-batch."""
        return self.order.keys(*self.positions(batch))

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.serve(*((info.id, info.num_workers) if info is not None else (0, 1)))

    def serve(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, Any]]:
        """The micro-batches DataLoader worker ``worker`` of ``workers`` serves: this rank's
        ``start_batch + worker``-th, then every ``workers``-th after it."""
        end = None if self.infinite else self.batches_per_epoch
        cache: dict[int, np.ndarray | None] = {}  # shard -> samples (None: unreadable)
        held: dict[int, int] = {}  # partition -> the unit this worker is in (its shards stay cached)
        reads, failed, epoch_now = 0, 0, None
        spare: tuple[torch.Tensor, list[int]] | None = None  # a readable validation batch, for bad ones
        owed: list[int] = []  # validation batches still to serve once a readable one turns up
        bad_ids: list[int] = []
        i = self.start_batch + worker
        while end is None or i < end:
            epoch, unit, shard, index = self.order.locate(*self.positions(i))
            if epoch != epoch_now:
                if reads and reads == failed:
                    raise DataReadError(
                        f"rank {self.rank} worker {worker}: none of the {reads} shards it needed in epoch "
                        f"{epoch_now} could be read (e.g. {self.shards[0].url}). Check data.dir / data.shard_url."
                    )
                cache.clear()
                held.clear()
                reads, failed, epoch_now = 0, 0, epoch
            for s in np.unique(shard).tolist():
                if s not in cache:
                    cache[s] = self._read_shard(s)
                    reads += 1
                    if cache[s] is None:
                        failed += 1
                        bad_ids.append(s)
            rows = self._take(cache, shard, index)
            keys = sample_key(shard, index).tolist()
            self._release(cache, held, epoch, unit)
            j, g = i, i // self.accumulation
            i += workers
            if rows is None:  # training: a placeholder (keeps the workers' round-robin intact);
                if self.infinite:  # validation: a readable stand-in (keeps the step count)
                    yield self._item(None, keys, j, g, bad_ids)
                elif spare is None:
                    owed.append(j)
                    continue
                else:
                    yield self._item(*spare, j, g, bad_ids)
                bad_ids = []
                continue
            for k in [*owed, j]:
                yield self._item(rows, keys, k, k // self.accumulation, bad_ids)
                bad_ids = []
            spare, owed = (rows, keys), []
        if reads and reads == failed:
            raise DataReadError(
                f"rank {self.rank} worker {worker}: none of the {reads} shards it needed could be read "
                f"(e.g. {self.shards[0].url}). Check data.dir / data.shard_url."
            )

    def _take(self, cache: dict[int, np.ndarray | None], shard: np.ndarray, index: np.ndarray) -> torch.Tensor | None:
        """The micro-batch's rows (None if a sample's shard is unreadable)."""
        out = np.empty((len(shard), self.sample_len), dtype=np.uint16)
        for s in np.unique(shard).tolist():
            arr = cache[s]
            if arr is None:
                return None
            here = shard == s
            out[here] = arr[index[here]]
        return torch.from_numpy(out.astype(np.int64))

    def _release(self, cache: dict[int, np.ndarray | None], held: dict[int, int], epoch: int, unit: np.ndarray) -> None:
        """Advance the worker's current unit per partition and drop shards no current unit holds:
        units are served in order, so a shard left behind is not needed again this epoch."""
        partition_of = np.searchsorted(self.order.bounds, self.order.unit_bounds[unit], side="right") - 1
        changed = False
        for p, u in zip(partition_of.tolist(), unit.tolist(), strict=True):
            if held.get(p, -1) < u:
                held[p], changed = u, True
        if changed:
            keep = {int(s) for u in held.values() for s in self.order.unit_shards(epoch, u)}
            for s in [s for s in cache if s not in keep]:
                del cache[s]

    def _item(self, rows: torch.Tensor | None, keys: list[int], j: int, g: int, bad_ids: list[int]) -> dict[str, Any]:
        # Plain ints travel from worker processes almost for free; each tensor costs a shared-memory
        # segment, so only the tokens are one (the loader makes the keys a tensor: PackedLoader).
        return {"tokens": rows, "sample_keys": keys, "batch_index": j, "global_batch": g, "bad_shards": list(bad_ids)}

    def _read_shard(self, s: int) -> np.ndarray | None:
        """The shard's samples, or None (with a warning) when it cannot be read."""
        self.shards_read.append(s)
        return read_samples(self.shards[s], self.sample_len)


def read_samples(shard: Shard, sample_len: int) -> np.ndarray | None:
    """A shard's samples, or None (with a warning) when it cannot be read. Remote shards (URLs,
    ``pipe:``) get ``REMOTE_ATTEMPTS`` tries, as network reads fail transiently."""
    remote = "://" in shard.url or shard.url.startswith("pipe:")
    attempts = REMOTE_ATTEMPTS if remote else 1
    for attempt in range(1, attempts + 1):
        try:
            arr = read_shard(shard.url, sample_len, shard.samples, shard.crc32)
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


SOURCE_SHIFT = 48  # a mixture's sample key: source << SOURCE_SHIFT | sample_key(shard, index)


class MixtureStream(IterableDataset):
    """Training micro-batches of a weighted mixture, in :class:`PackedStream`'s layout.

    Global batch ``b`` gives source ``k`` a block of ``plan.slots(b)[k]`` slots
    (:class:`cgpt.data.mixture.MixturePlan`), filled with the next positions of that source's own
    :class:`SampleOrder`: each source has its own shuffle and epochs, so a source that runs out
    starts its next epoch, in a new order, while the others go on. Rank ``r`` of ``W`` serves slots
    ``[r G/W, (r+1) G/W)`` of every global batch as ``G / (W B)`` micro-batches of ``B``, and
    micro-batch ``i`` is built by dataloader worker ``i % num_workers``: the batches depend neither
    on the world size nor on the worker count, and a resume at micro-batch ``k`` is exact.

    Items are :class:`PackedStream`'s; ``sample_keys`` carry the source index in their bits from
    ``SOURCE_SHIFT`` up, and ``bad_shards`` ids index the concatenation of the sources' shard lists.

    Args:
        sources: each source's training shards (from its meta.json).
        plan: the slots per source of every global batch (its ``global_batch`` is ``G``).
        sample_len: tokens per sample (``seq_len + 1``), the same for every source.
        micro_batch_size, rank, world_size, seed, start_batch, mix_shards: as :class:`PackedStream`'s.

    A source's order has one partition: its block of a global batch is a run of consecutive positions,
    so a worker holds about ``mix_shards`` shards of each source (several partitions would spread
    every block over all of them). The price: every rank reads every shard of every source.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[Shard]],
        plan: Any,
        sample_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        mix_shards: int = 4,
    ) -> None:
        super().__init__()
        G = plan.global_batch
        if not 0 <= rank < world_size or micro_batch_size <= 0 or G % (micro_batch_size * world_size):
            raise ValueError(
                f"global batch {G} must be a multiple of micro_batch_size {micro_batch_size} x world size "
                f"{world_size} (rank {rank})"
            )
        self.sources = [list(s) for s in sources]
        self.plan = plan
        self.sample_len = sample_len
        self.batch = micro_batch_size
        self.rank, self.world = rank, world_size
        self.global_batch = G
        self.accumulation = G // (micro_batch_size * world_size)
        self.start_batch = start_batch
        self.mix = mix_shards
        # every source its own order; the seed key keeps two sources of one size from sharing permutations
        self.orders = [
            SampleOrder([s.samples for s in shards], G, 1, mix_shards, seed * 1_000_003 + k + 1, True)
            for k, shards in enumerate(self.sources)
        ]
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).tolist()
        for name, order in zip(plan.names, self.orders, strict=True):
            if order.per_epoch == 0:
                raise ValueError(
                    f"data source {name!r}: {order.total} samples, fewer than one global batch of {G}; prepare "
                    "more data for it or lower data.global_batch_size"
                )

    @property
    def epoch_samples(self) -> list[int]:
        """Samples per epoch of every source (what the mixture ledger counts epochs in)."""
        return [o.per_epoch for o in self.orders]

    def pieces(self, batch: int) -> list[tuple[int, int, int]]:
        """``(source, first, end)`` positions in the sources' orders of this rank's ``batch``-th
        micro-batch, in slot order."""
        g, m = divmod(batch, self.accumulation)
        lo = self.rank * (self.global_batch // self.world) + m * self.batch
        hi = lo + self.batch
        before, at, out = self.plan.consumed(g), 0, []
        for k, n in enumerate(self.plan.slots(g).tolist()):
            a, b = max(at, lo), min(at + n, hi)
            if a < b:
                out.append((k, int(before[k]) + a - at, int(before[k]) + b - at))
            at += n
        return out

    def keys(self, batch: int) -> np.ndarray:
        """Sample keys (with the source) of this rank's ``batch``-th micro-batch."""
        return np.concatenate(
            [(np.int64(k) << SOURCE_SHIFT) | self.orders[k].keys(a, b) for k, a, b in self.pieces(batch)]
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        caches: list[dict[int, np.ndarray | None]] = [{} for _ in self.sources]
        limit = self.mix + 2  # shards a worker keeps per source; the oldest go first (units are read in order)
        bad_ids: list[int] = []
        i = self.start_batch + worker
        while True:
            out = np.empty((self.batch, self.sample_len), dtype=np.int64)  # filled in place: one copy per sample
            keys: list[np.ndarray] = []
            readable, row = True, 0
            for k, start, stop in self.pieces(i):
                key = self.orders[k].keys(start, stop)
                shard, index = key >> KEY_SHIFT, key & ((1 << KEY_SHIFT) - 1)
                cache, needed = caches[k], np.unique(shard).tolist()
                for old in [s for s in cache if s not in needed][: max(0, len(cache) + len(needed) - limit)]:
                    del cache[old]
                for s in needed:
                    if s not in cache:
                        cache[s] = read_samples(self.sources[k][s], self.sample_len)
                        if cache[s] is None:
                            bad_ids.append(self.offsets[k] + s)
                readable = readable and all(cache[s] is not None for s in needed)
                if readable:
                    part = out[row : row + len(shard)]
                    for s in needed:
                        here = shard == s
                        part[here] = cache[s][index[here]]
                row += len(shard)
                keys.append((np.int64(k) << SOURCE_SHIFT) | key)
            tokens = torch.from_numpy(out) if readable else None
            yield {
                "tokens": tokens,  # None: a placeholder the data module's loader drops (a shard was unreadable)
                "sample_keys": np.concatenate(keys).tolist(),  # a list: see PackedStream._item
                "batch_index": i,
                "global_batch": i // self.accumulation,
                "bad_shards": list(bad_ids),
            }
            bad_ids = []
            i += workers
