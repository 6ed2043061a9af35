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
    assert state["consumed_micro_batches"] == 4
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
        for _ in range(2):  # two epochs' worth of passes over the shard: still one bad shard
            for b in dm.train_dataloader().dataset._epoch_batches(0, 0, 0, 0, 1, [0, 0]):
                if b[2]:
                    dm.on_before_batch_transfer({"tokens": torch.zeros(1), "bad_shards": torch.tensor(b[2])}, 0)
    assert dm.bad_shards == 1 and dm.bad_shard_names == {name}
    resumed = PackedDataModule(str(data), micro_batch_size=4, seed=0)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.bad_shards == 1


def test_resume_with_another_layout_keeps_the_sample_position(data: Path) -> None:
    first = PackedDataModule(str(data), micro_batch_size=4, seed=3)
    first.consumed_micro_batches = 6
    again = PackedDataModule(str(data), micro_batch_size=8, seed=3)
    again.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match="another order"):
        assert again._resume_batch(world=1) == 3  # 24 samples in
