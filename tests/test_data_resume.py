"""End to end: the data ledger of a run resumed at another world size (2 -> 1 gloo processes) is
the uninterrupted run's and its training continues the uninterrupted one (the global gradient norm
and the global batch's loss of every step within 1e-5 in fp32); a checkpoint of another shard list
is refused before training; a corrupt shard is skipped and counted across a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    STEPS,
    WORLD_SIZE_STEP,
    assert_resumed_at,
    grad_norms,
    losses,
    pretrain_args,
    run_script,
    trace_ledger,
)

from cgpt.data.datamodule import PackedDataModule
from cgpt.data.stream import split_key


@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_ledger_and_losses(
    ddp_run: Path, ddp_run_resumed_on_one_rank, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """2 -> 1: the session's 2-process run (micro-batch 4 of a global batch of 8, no accumulation)
    resumed from its step-4 checkpoint by 1 process (2 accumulation steps) with 2 DataLoader workers
    (the 2-process run had none), in a folder holding a copy of it: the shared
    ``ddp_run_resumed_on_one_rank``, whose loaded state tests/test_world_size_resume.py compares.
    1 -> 2 and other layouts: tests/test_stream.py."""
    ref, ref_norms = trace_ledger(ddp_run / "trace"), grad_norms(ddp_run)
    assert sorted(ref) == list(range(STEPS)) and all(len(k) == 8 for k in ref.values())
    assert sorted(ref_norms) == list(range(STEPS))
    step, (out, _) = WORLD_SIZE_STEP, ddp_run_resumed_on_one_rank
    resume = f"resume={ddp_run / 'checkpoints' / f'step{step:07d}.ckpt'}"
    assert_resumed_at(out, step)  # its own log starts at the checkpoint's step: it resumed
    assert trace_ledger(out / "trace") == {g: ref[g] for g in range(step, STEPS)}  # the same samples per step
    norms = grad_norms(out)  # of the whole global batch's gradient: comparable at any world size
    assert sorted(norms) == list(range(step, STEPS))
    assert all(abs(norms[s] - ref_norms[s]) <= 1e-5 * ref_norms[s] for s in norms), (norms, ref_norms)
    # train/loss: the global batch's mean loss (over micro-batches and ranks), so the same at any world size
    got, ref_losses = losses(out), losses(ddp_run)
    assert sorted(got) == list(range(step, STEPS))
    assert all(abs(got[s] - ref_losses[s]) < 1e-5 for s in got), (got, ref_losses)

    # the data changed since the checkpoint (a shard less in meta.json): refused before any step
    changed = tmp_path / "changed"
    shutil.copytree(tiny_data_dir, changed)
    meta = json.loads((changed / "meta.json").read_text())
    meta["splits"]["train"]["shards"].pop()
    (changed / "meta.json").write_text(json.dumps(meta))
    refused = tmp_path / "refused"
    with pytest.raises(AssertionError, match="another shard list") as err:
        run_script(pretrain_args(changed, refused, "ddp", 1, resume), env={"CGPT_DATA_TRACE": str(refused / "trace")})
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

    common = ["train/pretrain.py", "experiment=smoke", f"data.dir={data}", "trainer.max_steps=4",
              "trainer.validate_every_steps=4", "callbacks.checkpoint.every_n_steps=2",
              "callbacks.checkpoint.keep_last=2", "sample=null"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script([*common, f"paths.output_dir={full}"], env={"CGPT_DATA_TRACE": str(full / "trace")})
    ckpt = full / "checkpoints" / "step0000002.ckpt"
    assert ckpt.is_file()
    run_script(
        [*common, f"paths.output_dir={resumed}", f"resume={ckpt}", "data.num_workers=2"],
        env={"CGPT_DATA_TRACE": str(resumed / "trace")},
    )
    a, b = (Path(f"{out / 'trace'}.rank0").read_text().splitlines() for out in (full, resumed))
    assert len(a) == 8 and len(b) == 4  # 4 steps x 2 micro-batches; the resumed run did 2 steps
    assert b == a[4:]  # the same batches (index, token checksum, keys), in the same order
    assert [int(line.split()[1]) for line in a] != list(range(8))  # batches needing the bad shard: skipped
    for out in (full, resumed):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bad_shards_skipped"] == 1
