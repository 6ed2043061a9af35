"""Shard-reading throughput of one dataloader worker vs what a GPU consumes.

    python bench/data_throughput.py [--data DIR] [--seconds 10] [--micro-batch-size 16]

Without ``--data`` it writes a synthetic dataset (random token ids, seq_len 2048, 64 MB shards)
to a temporary folder. It then times ``PackedStream`` (the training reader: CRC check, decode,
in-shard shuffle, micro-batch assembly) in this process and through a DataLoader with one worker
process (adds the transfer to the training process), and prints tokens/s next to the rate at
which cerebras-gpt-111m consumes tokens on one H200 at 50% MFU (from the FLOPs formula). The goal
is that one worker supplies at least 20x that rate.
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
from cgpt.data.shards import TOKEN_DTYPE, DatasetMeta, ShardWriter
from cgpt.data.stream import PackedStream
from cgpt.hardware import GPU_BF16_PEAK_FLOPS

GOAL = 20.0


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
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            print("writing a synthetic dataset (4 x 64 MB shards, seq_len 2048) ...", flush=True)
            synthetic_dataset(data)
        dm = PackedDataModule(str(data), micro_batch_size=args.micro_batch_size)
        stream = PackedStream(dm._shards("train"), dm.meta.sample_len, args.micro_batch_size, seed=0)
        in_process, _ = time_reader(stream, args.seconds)
        loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
        one_worker, _ = time_reader(loader, args.seconds)
        shape = (args.micro_batch_size, dm.meta.sample_len)
        transport, _ = time_reader(DataLoader(_Ready(shape), batch_size=None, num_workers=1), args.seconds)
        need = consumption_rate(args.model, args.gpu, args.mfu, dm.meta.seq_len)

    print(f"data: seq_len {dm.meta.seq_len}, micro-batch {args.micro_batch_size}")
    print(f"reader in-process:          {in_process / 1e6:10.2f} M tokens/s")
    print(f"one DataLoader worker:      {one_worker / 1e6:10.2f} M tokens/s")
    print(f"  (transfer alone, no read: {transport / 1e6:10.2f} M tokens/s: the DataLoader's own ceiling here)")
    print(f"{args.model} on one {args.gpu} at {100 * args.mfu:.0f}% MFU consumes {need / 1e6:10.3f} M tokens/s")
    for label, rate in (("the reader", in_process), ("one DataLoader worker", one_worker)):
        ratio = rate / need
        print(f"{label} supplies {ratio:.1f}x that (goal: >= {GOAL:.0f}x): {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    return 0 if one_worker / need >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
