"""Resume: picking the latest complete checkpoint, atomic sharded saves, and a single-process run
killed with SIGKILL in the middle of writing last.ckpt that continues bitwise like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import STEPS, assert_resumed_at, kill_while_saving_last, losses, pretrain_args, run_script, weights

from cgpt.weights import is_complete_checkpoint, resume_checkpoint


def test_resume_prefers_complete_last_then_newest_complete_step(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert resume_checkpoint(ckpts) is None
    (ckpts / "step0000002.ckpt").write_bytes(b"x")
    fsdp = ckpts / "step0000004.ckpt"  # a complete FSDP folder
    fsdp.mkdir()
    (fsdp / ".metadata").write_bytes(b"x")
    (fsdp / "meta.pt").write_bytes(b"x")
    broken = ckpts / "step0000006.ckpt"  # a DeepSpeed folder without its tag folder: incomplete
    broken.mkdir()
    (broken / "latest").write_text("checkpoint")
    (ckpts / ".step0000008.ckpt.tmp").mkdir()  # an interrupted save
    assert not is_complete_checkpoint(broken)
    assert resume_checkpoint(ckpts) == fsdp  # last.ckpt missing (crash between the two renames)
    (broken / "checkpoint").mkdir()
    assert resume_checkpoint(ckpts) == broken
    (ckpts / "last.ckpt").write_bytes(b"")  # empty: ignored
    assert resume_checkpoint(ckpts) == broken
    (ckpts / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(ckpts) == ckpts / "last.ckpt"


def test_atomic_dir_save_keeps_the_previous_checkpoint_when_the_save_fails(tmp_path: Path) -> None:
    from cgpt.strategies.checkpoint_io import atomic_dir_save

    class OneProcess:
        is_global_zero = True

        def broadcast(self, obj):
            return obj

        def barrier(self, name=None):
            pass

    def good(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "shard").write_text("new")

    def crash(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "shard").write_text("partial")
        raise RuntimeError("killed mid-save")

    path = tmp_path / "last.ckpt"
    path.mkdir()
    (path / "shard").write_text("old")
    with pytest.raises(RuntimeError):
        atomic_dir_save(OneProcess(), path, crash)
    assert (path / "shard").read_text() == "old"
    atomic_dir_save(OneProcess(), path, good)
    assert (path / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigkill_while_writing_last_ckpt_then_rerun_is_bitwise_identical(
    single_process_run, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """kill -9 while the step-4 last.ckpt is half written (its temporary file is there): the re-run
    resumes from the intact step-2 last.ckpt and continues bitwise like an uninterrupted run."""
    ref_out, out = single_process_run[0], tmp_path / "killed"
    args = pretrain_args(tiny_data_dir, out, "auto", 1)
    ckpts = out / "checkpoints"
    assert kill_while_saving_last(args, ckpts, 4, timeout=300), "the kill came after the save finished"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    proc = run_script(args, timeout=300)
    assert f"resuming from {ckpts / 'last.ckpt'}" in proc.stdout
    # Where it started: a re-run from step 0 would log the same losses (runs are deterministic).
    got, ref = assert_resumed_at(out, 2), losses(ref_out)
    assert all(got[step] == ref[step] for step in got)  # bitwise: weights, optimizer, schedule, data position
    a, b = weights(ckpts / "last.ckpt"), weights(ref_out / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_last_ckpt_holds_the_final_step_when_max_steps_is_not_a_checkpoint_step(
    single_process_run, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Checkpoints every 4 steps, STEPS = 6: without a save at the end of training, last.ckpt would
    hold step 4 and extending the run would redo steps 4 and 5."""
    out = tmp_path / "run"
    run_script(pretrain_args(tiny_data_dir, out, "auto", 1, "callbacks.checkpoint.every_n_steps=4"), timeout=300)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == STEPS
    ref = weights(single_process_run[0] / "checkpoints" / "last.ckpt")  # also step 6, same run
    got = weights(out / "checkpoints" / "last.ckpt")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert (out / "checkpoints" / f"step{STEPS:07d}.ckpt").is_file()
