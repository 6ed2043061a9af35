"""PackedDataModule: clear errors before training, shard URLs and pipes, the data position in
checkpoints (exact resume, also with another worker count), bad-shard counting."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cgpt.data.datamodule import DataMismatchError, PackedDataModule
from cgpt.data.shards import ShardFormatError
from cgpt.data.stream import split_key


def _ids(loader, n: int) -> list[list[int]]:
    return [b["tokens"][:, :4].reshape(-1).tolist() for _, b in zip(range(n), loader)]


@pytest.fixture
def data(tiny_data_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_data_dir, tmp_path / "data")
    return tmp_path / "data"


def _edit_meta(data: Path, **changes) -> None:
    meta = json.loads((data / "meta.json").read_text())
    meta.update(changes)
    (data / "meta.json").write_text(json.dumps(meta))


def test_mismatched_data_is_refused_before_training(data: Path) -> None:
    dm = PackedDataModule(str(data))
    dm.validate(None, 50257, block_size=64)  # fits
    with pytest.raises(DataMismatchError, match="--seq-len 128"):
        dm.validate(128, 50257)
    with pytest.raises(DataMismatchError, match="vocab"):
        dm.validate(None, 1000)
    with pytest.raises(DataMismatchError, match="tokenizer"):
        dm.validate(None, 50257, tokenizer="llama")
    with pytest.raises(DataMismatchError, match="context"):
        dm.validate(None, 50257, block_size=32)


def test_missing_or_empty_data_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data/prepare.py"):
        PackedDataModule(str(tmp_path / "nowhere"))
    _edit_meta(data, format="something-else")
    with pytest.raises(ShardFormatError, match="re-run data/prepare.py"):
        PackedDataModule(str(data))
    _edit_meta(data, format="cgpt-packed-v1")
    for shard in data.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(DataMismatchError, match="none of the .* train shards"):
        PackedDataModule(str(data)).validate(None, 50257)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"] = []
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataMismatchError, match="train split is empty"):
        PackedDataModule(str(data)).validate(None, 50257)


def test_training_batches_carry_sample_keys(data: Path) -> None:
    dm = PackedDataModule(str(data), micro_batch_size=4, seed=7, num_workers=1)
    stream = dm.train_dataloader().dataset
    for i, b in zip(range(3), dm.train_dataloader()):
        keys = b["sample_keys"]
        assert keys.dtype == torch.int64 and keys.shape == (4,) and keys.tolist() == stream.keys(i).tolist()
        shard, index = split_key(keys.numpy())
        for row, s, k in zip(b["tokens"], shard, index, strict=True):  # each key names its row's sample
            assert row[:8].tolist() == stream._read_shard(int(s))[int(k)][:8].tolist()


def test_shard_url_pipe_reads_the_same_batches(data: Path) -> None:
    local = PackedDataModule(str(data), micro_batch_size=4, seed=7)
    piped = PackedDataModule(str(data), micro_batch_size=4, seed=7, shard_url=f"pipe:cat {data}/{{name}}")
    assert _ids(piped.train_dataloader(), 5) == _ids(local.train_dataloader(), 5)
    assert _ids(piped.val_dataloader(), 3) == _ids(local.val_dataloader(), 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_at_the_next_batch(data: Path, workers: int) -> None:
    full = _ids(PackedDataModule(str(data), micro_batch_size=4, seed=3).train_dataloader(), 9)
    first = PackedDataModule(str(data), micro_batch_size=4, seed=3)
    first.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)  # counted only while training
    batches = [b for _, b in zip(range(5), first.train_dataloader())]
    for b in batches[:4]:
        first.on_before_batch_transfer(b, 0)  # what the trainer calls for each consumed batch
    first.trainer.training = False  # a batch seen outside training (validation) is not a position
    first.on_before_batch_transfer(batches[4], 0)
    state = first.state_dict()
    assert state["consumed_global_batches"] == 4 and state["consumed_samples"] == 16
    again = PackedDataModule(str(data), micro_batch_size=4, seed=3, num_workers=workers)
    again.load_state_dict(state)
    assert _ids(again.train_dataloader(), 5) == full[4:]


def test_bad_shards_are_counted_once_and_survive_resume(data: Path) -> None:
    dm = PackedDataModule(str(data), micro_batch_size=4, seed=0)
    name = dm.meta.shards("train")[0]["name"]
    raw = (data / name).read_bytes()
    (data / name).write_bytes(raw[:1000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # two passes over the epoch (and the shard): still one bad shard
            stream = dm.train_dataloader().dataset
            for _, b in zip(range(stream.batches_per_epoch), stream):
                if b["bad_shards"]:
                    dm.on_before_batch_transfer(
                        {"tokens": torch.zeros(1), "bad_shards": torch.tensor(b["bad_shards"])}, 0
                    )
    assert dm.bad_shards == 1 and dm.bad_shard_names == {name}
    resumed = PackedDataModule(str(data), micro_batch_size=4, seed=0)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.bad_shards == 1


def _consumed(dm: PackedDataModule, world: int, global_batches: int) -> dict:
    """The checkpoint state of a run at ``world`` ranks after ``global_batches`` optimizer steps."""
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=world)
    accumulation = dm.train_dataloader().dataset.accumulation
    dm.consumed_global_batches, dm.consumed_micro_batches = global_batches, global_batches * accumulation
    return dm.state_dict()


def _keys(dm: PackedDataModule, world: int, global_batches: int) -> list[list[int]]:
    """Sorted sample keys of the next ``global_batches`` global batches, over ``world`` ranks."""
    out: dict[int, list[int]] = {}
    for rank in range(world):
        dm.trainer = SimpleNamespace(training=True, global_rank=rank, world_size=world)
        stream = dm.train_dataloader().dataset
        for _, b in zip(range(global_batches * stream.accumulation), stream):
            out.setdefault(b["global_batch"], []).extend(b["sample_keys"])
    return [sorted(out[g]) for g in sorted(out)]


def test_resume_at_another_world_size_is_exact(data: Path) -> None:
    full = _keys(PackedDataModule(str(data), micro_batch_size=2, seed=3, global_batch_size=8), 2, 7)
    state = _consumed(PackedDataModule(str(data), micro_batch_size=2, seed=3, global_batch_size=8), 2, 3)
    assert state["consumed_samples"] == 24 and state["world_size"] == 2
    again = PackedDataModule(str(data), micro_batch_size=2, seed=3, global_batch_size=8, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "another order" warning: the same order continues
        again.load_state_dict(state)
        assert _keys(again, 1, 4) == full[3:]


def test_resume_with_another_global_batch_keeps_the_sample_position(data: Path) -> None:
    state = _consumed(PackedDataModule(str(data), micro_batch_size=4, seed=3, global_batch_size=8), 1, 6)
    again = PackedDataModule(str(data), micro_batch_size=4, seed=3, global_batch_size=16)
    again.load_state_dict(state)
    with pytest.warns(UserWarning, match="same 48 samples"):
        assert again._resume_global_batch(16) == 3
    old = {"consumed_micro_batches": 6, "micro_batch_size": 4, "world_size": 2, "seed": 3}  # the previous format
    again.load_state_dict(old)
    with pytest.warns(UserWarning, match="older order"):
        assert again._resume_global_batch(16) == 3


def test_resume_on_another_order_is_refused(data: Path) -> None:
    state = _consumed(PackedDataModule(str(data), micro_batch_size=4, seed=3, global_batch_size=8), 1, 2)
    for change in ({"seed": 4}, {"partitions": 2}, {"mix_shards": 1}):
        other = PackedDataModule(str(data), **{"micro_batch_size": 4, "seed": 3, **change})
        with pytest.raises(DataMismatchError, match=f"{next(iter(change))} .* -> "):
            other.load_state_dict(state)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"].pop()  # a shard less: another preparation of the data
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataMismatchError, match="another shard list .* start a new run"):
        PackedDataModule(str(data), micro_batch_size=4, seed=3).load_state_dict(state)
