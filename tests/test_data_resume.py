"""End to end: the data ledger of a run resumed at another world size is the uninterrupted run's
(2 -> 1 and 1 -> 2 gloo processes) and its training continues the uninterrupted one (the global
gradient norm of every step, rank 0's loss once back at 2 ranks, within 1e-5 in fp32); a
checkpoint of another shard list is refused before training; a corrupt shard is skipped and
counted."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import STEPS, assert_resumed_at, losses, pretrain_args, run_script

from cgpt.data.datamodule import PackedDataModule
from cgpt.data.stream import split_key


def ledger(trace: Path) -> dict[int, list[int]]:
    """Sorted sample keys of each global batch, over the ranks' trace files (CGPT_DATA_TRACE)."""
    out: dict[int, list[int]] = {}
    for part in trace.parent.glob(trace.name + ".rank*"):
        for line in part.read_text().splitlines():
            global_batch, _, _, keys = line.split()
            out.setdefault(int(global_batch), []).extend(map(int, keys.split(",")))
    return {g: sorted(k) for g, k in sorted(out.items())}


def grad_norms(out: Path) -> dict[int, float]:
    """Per step: the logged pre-clip norm of the (all-reduced) gradient of the global batch."""
    result: dict[int, float] = {}
    for path in (out / "csv").glob("version_*/metrics.csv"):
        with open(path) as f:
            result.update({int(r["step"]): float(r["grad_norm"]) for r in csv.DictReader(f) if r.get("grad_norm")})
    return result


def _run(data: Path, out: Path, devices: int, *extra: str) -> None:
    # micro-batch 2 of a global batch of 8: 2 accumulation steps on 2 ranks, 4 on one
    args = pretrain_args(data, out, "ddp", devices, "data.micro_batch_size=2", *extra)
    run_script(args, timeout=400, env={"CGPT_DATA_TRACE": str(out / "trace")})


@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_ledger_and_losses(tiny_data_dir: Path, tmp_path: Path) -> None:
    full, two_to_one, one_to_two = tmp_path / "full", tmp_path / "w2to1", tmp_path / "w1to2"
    keep = "callbacks.checkpoint.keep_last=3"  # checkpoints at steps 2, 4 and 6
    _run(tiny_data_dir, full, 2, keep)
    # 1 process with 2 DataLoader workers (the uninterrupted run had none)
    _run(
        tiny_data_dir, two_to_one, 1, keep, "data.num_workers=2", f"resume={full / 'checkpoints' / 'step0000002.ckpt'}"
    )
    _run(tiny_data_dir, one_to_two, 2, keep, f"resume={two_to_one / 'checkpoints' / 'step0000004.ckpt'}")
    ref, ref_losses, ref_norms = ledger(full / "trace"), losses(full), grad_norms(full)
    assert sorted(ref) == list(range(STEPS)) and all(len(k) == 8 for k in ref.values())
    for out, step in ((two_to_one, 2), (one_to_two, 4)):
        got = assert_resumed_at(out, step)  # its own log starts at the checkpoint's step: it resumed
        assert ledger(out / "trace") == {g: ref[g] for g in range(step, STEPS)}  # the same samples per step
        norms = grad_norms(out)  # of the whole global batch's gradient: comparable at any world size
        assert sorted(norms) == list(range(step, STEPS))
        assert all(abs(norms[s] - ref_norms[s]) <= 1e-5 * ref_norms[s] for s in norms), (norms, ref_norms)
    # train/loss is rank 0's last micro-batch: at 2 ranks the same slice of the global batch as the
    # uninterrupted run's, so after the 1-process stretch (steps 2-3) it must continue it
    got = losses(one_to_two)
    assert all(abs(got[s] - ref_losses[s]) < 1e-5 for s in got), (got, ref_losses)

    # the data changed since the checkpoint (a shard less in meta.json): refused before any step
    changed = tmp_path / "changed"
    shutil.copytree(tiny_data_dir, changed)
    meta = json.loads((changed / "meta.json").read_text())
    meta["splits"]["train"]["shards"].pop()
    (changed / "meta.json").write_text(json.dumps(meta))
    refused = tmp_path / "refused"
    with pytest.raises(AssertionError, match="another shard list") as err:
        _run(changed, refused, 1, f"resume={full / 'checkpoints' / 'step0000004.ckpt'}")
    assert "start a new run" in str(err.value) and not (refused / "trace.rank0").exists()


@pytest.mark.slow
def test_a_corrupt_shard_is_skipped_and_counted_across_a_resume(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    dm = PackedDataModule(str(data), micro_batch_size=4, seed=1234, global_batch_size=8)
    stream = dm.train_dataloader().dataset
    first_shard = dm.meta.shards("train")[int(split_key(stream.keys(0))[0][0])]["name"]
    raw = (data / first_shard).read_bytes()
    (data / first_shard).write_bytes(raw[: len(raw) // 2])  # truncated: needed by the first batch, skipped

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
    a, b = (Path(f"{out / 'trace'}.rank0").read_text().splitlines() for out in (full, resumed))
    assert len(a) == 12 and len(b) == 6  # 6 steps x 2 micro-batches; the resumed run did 3 steps
    assert b == a[6:]  # the same batches (index, token checksum, keys), in the same order
    assert [int(line.split()[1]) for line in a] != list(range(12))  # batches needing the bad shard: skipped
    for out in (full, resumed):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bad_shards_skipped"] == 1
