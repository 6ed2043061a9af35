"""PackedStream: equal batches per rank, disjoint coverage, worker-count independence, exact
resume, URLs and pipes, bad shards."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cgpt.data.shards import ShardWriter
from cgpt.data.stream import DataReadError, PackedStream, Shard

SAMPLE_LEN = 9


def make_shards(tmp_path: Path, sizes: list[int], split: str = "train") -> list[Shard]:
    """Shards whose sample number ``k`` (over all shards) starts with token ``k``: ids are visible."""
    shards, k = [], 0
    for i, n in enumerate(sizes):
        w = ShardWriter(tmp_path, f"{split}{i}", n)
        for _ in range(n):
            w.write(np.full(SAMPLE_LEN, k, dtype=np.uint16) + np.arange(SAMPLE_LEN, dtype=np.uint16) * 0)
            k += 1
        (rec,) = w.finish()
        shards.append(Shard(str(tmp_path / rec["name"]), rec["samples"], rec["crc32"]))
    return shards


def batches(stream: PackedStream, workers: int = 0, limit: int | None = None) -> list[list[int]]:
    """Sample ids of each micro-batch, as a DataLoader with ``workers`` processes serves them."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for b in loader:
        if limit is not None and len(out) == limit:
            break
        if b["tokens"] is not None:  # None: a placeholder for a batch that needed a bad shard
            out.append(b["tokens"][:, 0].tolist())
    return out


@pytest.mark.parametrize(
    "sizes,world,batch",
    [
        ([16] * 8, 4, 4),  # shards divide evenly: full coverage
        ([10] * 3, 2, 2),  # one leftover shard, split within
        ([50], 4, 4),  # fewer shards than ranks
        ([7, 13, 9, 20, 3], 2, 3),  # uneven shards
        ([12] * 5, 3, 2),
    ],
)
def test_ranks_get_equal_disjoint_batches_covering_the_epoch(tmp_path: Path, sizes, world, batch) -> None:
    shards = make_shards(tmp_path, sizes)
    per_rank = []
    for rank in range(world):
        stream = PackedStream(shards, SAMPLE_LEN, batch, rank, world, seed=3, infinite=False)
        got = batches(stream)
        assert got == batches(stream, workers=2)  # the order does not depend on the worker count
        assert all(len(b) == batch for b in got)
        per_rank.append([i for b in got for i in b])
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1  # every rank the same number of batches: no DDP hang
    seen = [i for p in per_rank for i in p]
    assert len(seen) == len(set(seen))  # no sample twice within the epoch
    total = sum(sizes)
    # the documented drop: what ranks hold beyond the smallest one, plus a partial batch each
    assert total - len(seen) <= world * (batch - 1) + (world - 1) * max(sizes)
    if sizes == [16] * 8:
        assert sorted(seen) == list(range(total))


def test_epochs_reshuffle_and_seed_decides(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [8] * 4)
    one = PackedStream(shards, SAMPLE_LEN, 4, seed=1)
    per_epoch = one.batches_per_epoch
    run = batches(one, limit=3 * per_epoch)
    epochs = [sorted(i for b in run[e * per_epoch : (e + 1) * per_epoch] for i in b) for e in range(3)]
    assert all(e == list(range(32)) for e in epochs)  # each epoch covers everything once
    assert run[:per_epoch] != run[per_epoch : 2 * per_epoch]  # ... in a new order
    assert batches(PackedStream(shards, SAMPLE_LEN, 4, seed=1), limit=per_epoch) == run[:per_epoch]
    assert batches(PackedStream(shards, SAMPLE_LEN, 4, seed=2), limit=per_epoch) != run[:per_epoch]
    val = PackedStream(shards, SAMPLE_LEN, 4, shuffle=False, infinite=False)
    assert [i for b in batches(val) for i in b] == list(range(32))  # validation keeps file order


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (2, 3), (1, 0)])
def test_resume_continues_exactly(tmp_path: Path, workers_before: int, workers_after: int) -> None:
    shards = make_shards(tmp_path, [10, 6, 9, 12])
    for rank in range(2):
        full = batches(PackedStream(shards, SAMPLE_LEN, 3, rank, 2, seed=5), workers_before, limit=14)
        for k in (1, 4, 5, 9):  # within the first epoch and past it (5 batches per epoch here)
            resumed = PackedStream(shards, SAMPLE_LEN, 3, rank, 2, seed=5, start_batch=k)
            assert batches(resumed, workers_after, limit=14 - k) == full[k:]


def test_batch_index_counts_consumed_batches(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [10, 10])
    stream = PackedStream(shards, SAMPLE_LEN, 2, seed=0, start_batch=7)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    assert [int(b["batch_index"]) for _, b in zip(range(6), loader)] == list(range(7, 13))


def test_pipe_urls_read_like_files(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [6, 6, 6])
    piped = [Shard(f"pipe:cat {s.url}", s.samples, s.crc32) for s in shards]
    local = batches(PackedStream(shards, SAMPLE_LEN, 3, seed=4, infinite=False))
    assert batches(PackedStream(piped, SAMPLE_LEN, 3, seed=4, infinite=False)) == local


def _corrupt(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    if how == "truncate":
        data = data[: len(data) // 3]
    else:  # flip token bytes, keep the tar valid: only the checksum can tell
        data[514:520] = b"\xff" * 6
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_bad_shard_is_skipped_and_reported(tmp_path: Path, how: str) -> None:
    shards = make_shards(tmp_path, [8, 8, 8, 8])
    _corrupt(shards[1].url, how)
    stream = PackedStream(shards, SAMPLE_LEN, 4, shuffle=False, infinite=False)
    with pytest.warns(UserWarning, match="skipping unreadable shard"):
        got = list(stream)
    bad = [i for b in got for i in b["bad_shards"]]
    assert bad == [1]
    seen = [i for b in got for i in b["tokens"][:, 0].tolist()]
    # validation keeps its batch count (a readable batch stands in), and never serves bad data
    assert len(got) == stream.batches_per_epoch and not set(range(8, 16)) & set(seen)
    train = PackedStream(shards, SAMPLE_LEN, 4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = [b["tokens"] for _, b in zip(range(8), train)]
    served = {i for t in first if t is not None for i in t[:, 0].tolist()}
    assert None in first and not set(range(8, 16)) & served  # placeholders, never bad data


def test_all_shards_unreadable_is_an_error(tmp_path: Path) -> None:
    shards = [Shard(str(tmp_path / f"missing-{i}.tar"), 8) for i in range(2)]
    with pytest.warns(UserWarning), pytest.raises(DataReadError, match="Check data.dir"):
        for batch in PackedStream(shards, SAMPLE_LEN, 4):
            assert batch["tokens"] is None  # placeholders until the epoch proves nothing is readable


def test_too_little_data_is_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [3])
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        PackedStream(shards, SAMPLE_LEN, 4)
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        PackedStream(make_shards(tmp_path, [8]), SAMPLE_LEN, 4, rank=1, world_size=4)


def test_tokens_are_int64_tensors(tmp_path: Path) -> None:
    b = next(iter(PackedStream(make_shards(tmp_path, [4]), SAMPLE_LEN, 2)))
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (2, SAMPLE_LEN)


def test_batches_mix_shards(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [16] * 8)

    def shards_per_batch(mix: int) -> list[int]:
        got = batches(PackedStream(shards, SAMPLE_LEN, 4, seed=0, infinite=False, mix_shards=mix))
        return [len({i // 16 for i in b}) for b in got]

    assert set(shards_per_batch(1)) == {1}  # one shard at a time
    mixed = shards_per_batch(4)
    assert max(mixed) > 1 and sum(m > 1 for m in mixed) > len(mixed) // 2


@pytest.mark.slow  # DataLoader worker processes
def test_order_with_a_bad_shard_does_not_depend_on_workers(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [8] * 6)
    _corrupt(shards[2].url, "truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [batches(PackedStream(shards, SAMPLE_LEN, 2, seed=1, mix_shards=2), w, limit=20) for w in (0, 2, 3)]
    assert runs[0] == runs[1] == runs[2]
    assert not set(range(16, 24)) & {i for b in runs[0] for i in b}


def test_remote_shards_get_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cgpt.data.stream as stream_mod

    shards = make_shards(tmp_path, [4])
    flaky = tmp_path / "flaky.sh"  # fails on its first call, then serves the shard
    flaky.write_text(f"if [ -e {tmp_path}/once ]; then cat {shards[0].url}; else touch {tmp_path}/once; exit 1; fi\n")
    monkeypatch.setattr(stream_mod, "RETRY_DELAY_S", 0.0)
    piped = [Shard(f"pipe:sh {flaky}", 4, shards[0].crc32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping" warning: the second try worked
        assert batches(PackedStream(piped, SAMPLE_LEN, 2, shuffle=False, infinite=False)) == [[0, 1], [2, 3]]


def test_sample_keys_name_shard_and_index_at_any_world_size(tmp_path: Path) -> None:
    """A sample's key is shard index * 2**32 + its index within the shard, whatever rank serves it."""
    sizes = [7, 13, 9]
    shards = make_shards(tmp_path, sizes)
    first = np.cumsum([0, *sizes])  # sample id (first token) of each shard's sample 0
    for world in (1, 2):
        for rank in range(world):
            stream = PackedStream(shards, SAMPLE_LEN, 3, rank, world, seed=1, infinite=False, mix_shards=2)
            for b in stream:
                keys = b["sample_keys"]
                assert keys.dtype == torch.int64 and keys.shape == (3,)
                ids = [int(first[k >> 32] + (k & (2**32 - 1))) for k in keys.tolist()]
                assert ids == b["tokens"][:, 0].tolist()
