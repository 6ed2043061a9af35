"""Shard-reading throughput of one dataloader worker vs what a GPU consumes.

    python bench/data_throughput.py [--data DIR] [--seconds 10] [--micro-batch-size 16]
    python bench/data_throughput.py --sources 3 --shards 2   # a weighted mixture of 3 synthetic sources

Without ``--data`` it writes a synthetic dataset (random token ids, seq_len 2048, 64 MB shards)
to a temporary folder. It then times ``PackedStream`` (the training reader: CRC check, decode,
in-shard shuffle, micro-batch assembly) in this process and through a DataLoader with one worker
process (adds the transfer to the training process), and prints tokens/s next to the rate at
which cerebras-gpt-111m consumes tokens on one H200 at 50% MFU (from the FLOPs formula). The goal
is that one worker supplies at least 20x that rate.

It also measures the I/O of the global order (cgpt/data/stream.py): for world sizes 1, 2, 4, 8
(those that split ``--global-batch-size``), the bytes each rank reads over ``--io-batches`` global
batches (the real reader, in this process, counting the shards it opens), and with ``--workers``
DataLoader workers per rank, the bytes each worker reads. A rank should read about ``1/W`` of the
split (plus shards at its partitions' boundaries).

With ``--sources N`` (N >= 2) it writes N synthetic sources and also times ``MixtureStream`` over
them (weights 0.6/0.3/0.1 for three, equal otherwise) against ``PackedStream`` over the first
source alone; the mixture must keep at least 0.9x the single-source rate through one worker.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cgpt.config import ModelConfig
from cgpt.data.datamodule import PackedDataModule
from cgpt.data.mixture import MixturePlan
from cgpt.data.shards import TOKEN_DTYPE, DatasetMeta, ShardWriter
from cgpt.data.stream import MixtureStream, PackedStream
from cgpt.hardware import GPU_BF16_PEAK_FLOPS

GOAL = 20.0
MIXTURE_GOAL = 0.9  # a mixture's one-worker rate over a single source's


def synthetic_dataset(out: Path, seq_len: int = 2048, shards: int = 4, shard_mb: float = 64.0) -> None:
    """Random-token shards in the real format (the reader's cost does not depend on the ids)."""
    rng = np.random.default_rng(0)
    per_shard = int(shard_mb * 2**20) // ((seq_len + 1) * TOKEN_DTYPE.itemsize + 1024)
    writer = ShardWriter(out, "train", per_shard)
    for _ in range(shards * per_shard):
        writer.write(rng.integers(0, 50257, seq_len + 1, dtype=np.uint16))
    records = writer.finish()
    split = {"shards": records, "samples": sum(r["samples"] for r in records)}
    DatasetMeta(seq_len, "gpt2", 50257, 50256, {"train": split, "val": split}).save(out)


def consumption_rate(model: str, gpu: str, mfu: float, seq_len: int) -> float:
    """Tokens/s one training step consumes: MFU x peak FLOP/s / training FLOPs per token."""
    return mfu * GPU_BF16_PEAK_FLOPS[gpu] / ModelConfig.from_name(model).flops_per_token(seq_len)


def time_reader(batches, seconds: float, warmup: int = 2) -> tuple[float, int]:
    """Tokens/s over about ``seconds`` of pulling micro-batches (after ``warmup`` batches)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)["tokens"]
        tokens += batch.numel() if batch is not None else 0
    return tokens / (time.perf_counter() - start), tokens


def io_per_rank(
    dm: PackedDataModule, micro: int, global_batch: int, world: int, workers: int, batches: int
) -> tuple[list[int], list[int]]:
    """Bytes each rank reads over ``batches`` global batches, and (for rank 0) each of its workers."""
    sizes = [int(s["bytes"]) for s in dm.meta.shards("train")]
    per_rank, per_worker = [], []
    for rank in range(world):
        stream = PackedStream(
            dm._shards("train"), dm.meta.sample_len, micro, rank, world, seed=0,
            global_batch_size=global_batch, partitions=dm.partitions, mix_shards=dm.mix_shards,
        )  # fmt: skip
        n = batches * stream.accumulation
        for _ in zip(range(n), stream.serve()):
            pass
        per_rank.append(sum(sizes[s] for s in stream.shards_read))
        if rank == 0:
            for w in range(workers):
                stream.shards_read = []
                for _ in zip(range(len(range(w, n, workers))), stream.serve(w, workers)):
                    pass
                per_worker.append(sum(sizes[s] for s in stream.shards_read))
    return per_rank, per_worker


class _Ready(torch.utils.data.IterableDataset):
    """The same micro-batch over and over: what the DataLoader's transfer alone costs."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape

    def __iter__(self):
        x = torch.zeros(self.shape, dtype=torch.long)
        while True:
            yield {"tokens": x.clone(), "batch_index": 0, "bad_shards": []}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a prepared folder (default: a synthetic one)")
    p.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--model", default="cerebras-gpt-111m")
    p.add_argument("--gpu", default="H200", choices=sorted(GPU_BF16_PEAK_FLOPS))
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--shards", type=int, default=4, help="synthetic shards")
    p.add_argument("--shard-mb", type=float, default=64.0, help="synthetic shard size")
    p.add_argument("--global-batch-size", type=int, default=None, help="default: 8 micro-batches")
    p.add_argument(
        "--io-batches", type=int, default=None, help="global batches per I/O measurement (default: an epoch)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank in the I/O measurement")
    p.add_argument("--sources", type=int, default=1, help="synthetic sources of a mixture (>= 2) to time too")
    p.add_argument("--repeats", type=int, default=3, help="with --sources: alternated measurements, best kept")
    args = p.parse_args(argv)
    if args.sources > 1:
        return mixture_main(args)
    global_batch = args.global_batch_size or 8 * args.micro_batch_size

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            print(
                f"writing a synthetic dataset ({args.shards} x {args.shard_mb:g} MB shards, seq_len 2048) ...",
                flush=True,
            )
            synthetic_dataset(data, shards=args.shards, shard_mb=args.shard_mb)
        dm = PackedDataModule(str(data), micro_batch_size=args.micro_batch_size)
        stream = PackedStream(dm._shards("train"), dm.meta.sample_len, args.micro_batch_size, seed=0)
        in_process, _ = time_reader(stream, args.seconds)
        loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
        one_worker, _ = time_reader(loader, args.seconds)
        shape = (args.micro_batch_size, dm.meta.sample_len)
        transport, _ = time_reader(DataLoader(_Ready(shape), batch_size=None, num_workers=1), args.seconds)
        need = consumption_rate(args.model, args.gpu, args.mfu, dm.meta.seq_len)
        order = PackedStream(dm._shards("train"), dm.meta.sample_len, args.micro_batch_size,
                             global_batch_size=global_batch, partitions=dm.partitions).order  # fmt: skip
        io_batches = min(args.io_batches or order.rows_per_epoch, order.rows_per_epoch)
        split_bytes = sum(int(s["bytes"]) for s in dm.meta.shards("train"))
        io = {w: io_per_rank(dm, args.micro_batch_size, global_batch, w, args.workers, io_batches)
              for w in (1, 2, 4, 8) if global_batch % (w * args.micro_batch_size) == 0}  # fmt: skip

    print(f"data: seq_len {dm.meta.seq_len}, micro-batch {args.micro_batch_size}")
    print(f"reader in-process:          {in_process / 1e6:10.2f} M tokens/s")
    print(f"one DataLoader worker:      {one_worker / 1e6:10.2f} M tokens/s")
    print(f"  (transfer alone, no read: {transport / 1e6:10.2f} M tokens/s: the DataLoader's own ceiling here)")
    print(f"{args.model} on one {args.gpu} at {100 * args.mfu:.0f}% MFU consumes {need / 1e6:10.3f} M tokens/s")
    print(f"I/O over {io_batches} of {order.rows_per_epoch} global batches of {global_batch} (an epoch reads "
          f"{split_bytes / 2**20:.0f} MB of shards; {order.partitions} partitions, "
          f"{len(dm.meta.shards('train'))} shards):")  # fmt: skip
    for w, (ranks, workers) in io.items():
        mb = ", ".join(f"{b / 2**20:.0f}" for b in ranks)
        wk = ", ".join(f"{b / 2**20:.0f}" for b in workers)
        print(
            f"  world {w}: MB read per rank [{mb}] = {max(ranks) / split_bytes:.2f} of the split at most "
            f"(1/W = {1 / w:.2f}); rank 0 with {args.workers} workers (accumulation "
            f"{global_batch // (w * args.micro_batch_size)}): MB per worker [{wk}]"
        )
    for label, rate in (("the reader", in_process), ("one DataLoader worker", one_worker)):
        ratio = rate / need
        print(f"{label} supplies {ratio:.1f}x that (goal: >= {GOAL:.0f}x): {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    return 0 if one_worker / need >= GOAL else 1


def mixture_main(args: argparse.Namespace) -> int:
    """Time a mixture of ``args.sources`` synthetic sources against its first source alone."""
    n, B = args.sources, args.micro_batch_size
    weights = [0.6, 0.3, 0.1] if n == 3 else [1.0] * n
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / f"source{k}" for k in range(n)]
        print(f"writing {n} synthetic sources ({args.shards} x {args.shard_mb:g} MB shards each) ...", flush=True)
        for d in dirs:
            d.mkdir()
            synthetic_dataset(d, shards=args.shards, shard_mb=args.shard_mb)
        modules = [PackedDataModule(str(d), micro_batch_size=B) for d in dirs]
        meta = modules[0].meta
        single = PackedStream(modules[0]._shards("train"), meta.sample_len, B, seed=0)
        plan = MixturePlan([f"source{k}" for k in range(n)], weights, B)
        mixture = MixtureStream([m._shards("train") for m in modules], plan, meta.sample_len, B, seed=0)
        # alternated, best of --repeats: a shared machine's load drifts over a minute
        rates: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for name, stream in (("single source", single), (f"{n}-source mixture", mixture)):
                in_process = time_reader(stream, args.seconds)[0]
                loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
                one_worker = time_reader(loader, args.seconds)[0]
                best = rates.get(name, (0.0, 0.0))
                rates[name] = (max(best[0], in_process), max(best[1], one_worker))
        need = consumption_rate(args.model, args.gpu, args.mfu, meta.seq_len)
    print(f"data: seq_len {meta.seq_len}, micro-batch {B}, weights {weights}")
    for name, (in_process, one_worker) in rates.items():
        print(
            f"{name:>18}: in-process {in_process / 1e6:8.2f} M tokens/s, one worker {one_worker / 1e6:8.2f} M tokens/s"
        )
    print(f"{args.model} on one {args.gpu} at {100 * args.mfu:.0f}% MFU consumes {need / 1e6:10.3f} M tokens/s")
    mix_rate, single_rate = rates[f"{n}-source mixture"][1], rates["single source"][1]
    ratio, share = mix_rate / need, mix_rate / single_rate
    print(f"one worker on the mixture supplies {ratio:.1f}x that (goal: >= {GOAL:.0f}x): "
          f"{'OK' if ratio >= GOAL else 'BELOW GOAL'}")  # fmt: skip
    print(f"mixture / single source through one worker: {share:.2f} (goal: >= {MIXTURE_GOAL}): "
          f"{'OK' if share >= MIXTURE_GOAL else 'BELOW GOAL'}")  # fmt: skip
    return 0 if ratio >= GOAL and share >= MIXTURE_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
