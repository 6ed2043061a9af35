"""PackedStream: equal batches per rank, disjoint coverage, worker-count independence, exact
resume, URLs and pipes, bad shards."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cgpt.data.shards import ShardWriter
from cgpt.data.stream import DataReadError, PackedStream, Shard, split_key

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


SIZES = [7, 13, 9, 20, 3, 11, 16, 5, 12, 8, 14, 6]  # unequal shards, 124 samples
G, P = 8, 4  # global batch and partitions of the ledger tests


def ledger(shards: list[Shard], world: int, micro: int, workers: int, n: int, start: int = 0) -> list[list[int]]:
    """Sorted sample keys of global batches ``start .. n-1``, gathered over ``world`` ranks, each
    served through a DataLoader with ``workers`` processes. Checks each batch's tokens against its keys."""
    got: dict[int, list[int]] = {}
    for rank in range(world):
        s = PackedStream(shards, SAMPLE_LEN, micro, rank, world, seed=3, mix_shards=2, global_batch_size=G,
                         partitions=P, start_batch=start * G // (micro * world))  # fmt: skip
        loader = DataLoader(s, batch_size=None, num_workers=workers)
        for _, b in zip(range((n - start) * s.accumulation), loader):
            shard, index = split_key(b["sample_keys"])
            assert b["tokens"][:, 0].tolist() == (OFFSETS[shard] + index).tolist()  # the keys name the tokens
            got.setdefault(b["global_batch"], []).extend(b["sample_keys"])
    assert sorted(got) == list(range(start, n))
    assert all(len(v) == G for v in got.values())
    return [sorted(got[g]) for g in range(start, n)]


OFFSETS = np.concatenate([[0], np.cumsum(SIZES)])


@pytest.mark.slow  # DataLoader worker processes
def test_global_batches_are_the_same_at_any_world_size_and_worker_count(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, SIZES)
    order = PackedStream(shards, SAMPLE_LEN, 2, global_batch_size=G, partitions=P, seed=3, mix_shards=2).order
    n = order.rows_per_epoch + 3  # into the second epoch
    ref = ledger(shards, 1, 2, 0, n)
    for world, micro, workers in [(1, 4, 1), (2, 2, 2), (2, 4, 0), (4, 1, 2), (4, 2, 1)]:
        assert ledger(shards, world, micro, workers, n) == ref, (world, micro, workers)
    epoch = [k for b in ref[: order.rows_per_epoch] for k in b]
    assert len(epoch) == len(set(epoch))  # nothing twice within an epoch
    assert 0 <= sum(SIZES) - len(epoch) < G + P  # the documented drop: partitions' tails
    assert ref[order.rows_per_epoch] != ref[0]  # the next epoch is another order


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("before,after", [((2, 2, 0), (1, 2, 0)), ((1, 4, 0), (2, 2, 1)), ((4, 1, 0), (2, 2, 0)),
                                          ((2, 2, 2), (2, 2, 0))])  # fmt: skip
def test_resume_at_another_world_size_continues_the_ledger(tmp_path: Path, before, after) -> None:
    """(world, micro-batch, workers) before and after the restart at global batch s."""
    shards = make_shards(tmp_path, SIZES)
    full = ledger(shards, *before, 20)  # 15 global batches per epoch here: crosses into the next
    for s in (3, 16):
        assert ledger(shards, *after, 20, start=s) == full[s:]


def test_workers_and_ranks_read_only_their_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cgpt.data.stream as stream_mod

    sizes = [10] * 32
    shards = make_shards(tmp_path, sizes)
    reads = tmp_path / "reads"
    real = stream_mod.read_shard

    def counted(url: str, *args, **kwargs):
        with open(reads, "a") as f:  # a file: DataLoader workers are other processes
            f.write(f"{os.getpid()} {url}\n")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(stream_mod, "read_shard", counted)
    url_index = {s.url: i for i, s in enumerate(shards)}
    world, workers, micro = 2, 2, 2  # 2 micro-batches per rank per global batch: workers divide them
    bytes_per_rank = []
    for rank in range(world):
        s = PackedStream(
            shards, SAMPLE_LEN, micro, rank, world, seed=1, infinite=False, global_batch_size=G, partitions=P
        )
        n = s.batches_per_epoch
        reads.write_text("")
        assert len(list(zip(range(n), DataLoader(s, batch_size=None, num_workers=workers)))) == n
        by_worker: dict[str, list[int]] = {}
        for line in reads.read_text().splitlines():
            pid, url = line.split()
            by_worker.setdefault(pid, []).append(url_index[url])
        needed = [{int(k) for i in range(w, n, workers) for k in split_key(s.keys(i))[0]} for w in range(workers)]
        got = sorted(by_worker.values(), key=lambda r: r[0] not in needed[0])  # worker 0's reads first
        for w in range(workers):  # each worker reads just the shards its own micro-batches need, once
            assert sorted(got[w]) == sorted(needed[w]), (rank, w)
        assert len(needed[0] & needed[1]) <= 1  # at most a shard at its partitions' boundary is shared
        assert len(needed[0]) < 0.6 * len(needed[0] | needed[1])  # each worker about half the rank's shards
        bytes_per_rank.append(sum(sizes[i] for i in needed[0] | needed[1]))
    # each rank its 1/world of the bytes (P/W partitions of 80 samples, each touching <= 9 shards)
    assert all(b <= sum(sizes) / world + 2 * max(sizes) for b in bytes_per_rank), bytes_per_rank


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


def test_validation_splits_the_file_order_over_ranks(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [7, 13, 9])
    per_rank = [[i for b in batches(PackedStream(shards, SAMPLE_LEN, 3, r, 2, shuffle=False, infinite=False))
                 for i in b] for r in range(2)]  # fmt: skip
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of validation steps on every rank
    for ids in per_rank:  # each rank a contiguous stretch in file order: it reads about half the shards
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen) and 29 - len(seen) < 2 * 3 + 2


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
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedStream(shards, SAMPLE_LEN, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedStream(make_shards(tmp_path, [8]), SAMPLE_LEN, 4, rank=1, world_size=4)


def test_tokens_are_int64_tensors(tmp_path: Path) -> None:
    b = next(iter(PackedStream(make_shards(tmp_path, [4]), SAMPLE_LEN, 2)))
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (2, SAMPLE_LEN)


def test_batches_mix_shards(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [16] * 8)

    def shards_per_batch(mix: int, partitions: int) -> list[int]:
        stream = PackedStream(shards, SAMPLE_LEN, 4, seed=0, infinite=False, mix_shards=mix, partitions=partitions)
        return [len({i // 16 for i in b}) for b in batches(stream)]

    assert max(shards_per_batch(1, 1)) <= 2  # one shard's worth at a time (two where a unit straddles)
    for mixed in (shards_per_batch(4, 1), shards_per_batch(1, 4)):  # units of 4 shards, or 4 partitions
        assert max(mixed) > 2 and sum(m > 1 for m in mixed) > len(mixed) // 2


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
