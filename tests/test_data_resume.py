"""End to end: a training run stopped at step k and resumed (with another worker count) consumes
exactly the micro-batches an uninterrupted run consumes; a corrupt shard is skipped and counted
in summary.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_script

from cgpt.data.datamodule import PackedDataModule


def _trace(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in Path(f"{path}.rank0").read_text().splitlines()]


@pytest.mark.slow
def test_resumed_run_sees_the_same_batches(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    dm = PackedDataModule(str(data), micro_batch_size=4, seed=1234)
    stream = dm.train_dataloader().dataset
    first_shard = dm.meta.shards("train")[stream.epoch_plan(0)[0][0][0]]["name"]
    raw = (data / first_shard).read_bytes()
    (data / first_shard).write_bytes(raw[: len(raw) // 2])  # truncated: read first, skipped

    common = ["train/pretrain.py", "experiment=smoke", f"data.dir={data}", "trainer.max_steps=6",
              "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.keep_last=2", "sample=null"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script([*common, f"paths.output_dir={full}"], env={"CGPT_DATA_TRACE": str(full / "trace")})
    ckpt = full / "checkpoints" / "step0000003.ckpt"
    assert ckpt.is_file()
    run_script(
        [*common, f"paths.output_dir={resumed}", f"resume={ckpt}", "data.num_workers=2"],
        env={"CGPT_DATA_TRACE": str(resumed / "trace")},
    )
    a, b = _trace(full / "trace"), _trace(resumed / "trace")
    assert len(a) == 12 and len(b) == 6  # 6 steps x 2 micro-batches; the resumed run did 3 steps
    assert b == a[6:]  # the same batches (index and token checksum), in the same order
    assert [i for i, _ in a] != list(range(12))  # batches needing the truncated shard were skipped
    for out in (full, resumed):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bad_shards_skipped"] == 1
