"""Resume at another world size: every strategy's checkpoint written by W ranks continues at W'.

Each chain starts from a shared uninterrupted 2-process run (``ddp_run``, ``strategy_runs``), which
dumped its full training state once step WORLD_SIZE_STEP (4) was done: its step-4 checkpoint, copied
into a folder of the test's own as ``last.ckpt``, is resumed there at 1 rank (and, for the sharded
formats that reshard, back at 2 from the 1-rank run's checkpoint). Right after each load (before any
new step) the full training state is compared with the state the previous run saved: fp32 weights,
Adam exp_avg / exp_avg_sq and step, gathered to whole tensors by the test-only
:class:`cgpt.strategies.full_state.StateDump`. Global batch b is the same samples at any world size
and ``train/loss`` is the global batch's mean, so the losses of every leg must also continue those
of the session's uninterrupted 2-process DDP run (``ddp_run``) within 1e-5 (relative).

The fast tests at the end check the refusals: a checkpoint of another model shape, and one of
another strategy family than the run's.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    STEPS,
    WORLD_SIZE_STEP,
    _csv_losses,
    _csv_versions,
    copy_resume_point,
    losses,
    pretrain_args,
    run_script,
    state_dump,
)

from cgpt.config import TrainingDefaults
from cgpt.optim import SchedulerConfig, resolve_schedule
from cgpt.weights import ResumeError, check_resume

MOMENTS = ("params", "exp_avg", "exp_avg_sq", "step")


def reference_schedule() -> list[str]:
    """The lr schedule of a STEPS-step run, pinned: a leg that stops earlier (its own
    ``trainer.max_steps``) would otherwise decay to that leg's end instead."""
    s = resolve_schedule(SchedulerConfig(), TrainingDefaults.from_name("cerebras-gpt-tiny"), STEPS)
    return [f"scheduler.warmup_steps={s.warmup_steps}", f"scheduler.decay_steps={s.decay_steps}"]


def run_at(data_dir: Path, out: Path, strategy: str, devices: int, max_steps: int, dump: str, *extra: str):
    """One run of ``pretrain_args`` to ``max_steps`` (on the STEPS-step run's schedule) with the state
    dumped to ``out/dump``."""
    args = [a for a in pretrain_args(data_dir, out, strategy, devices) if not a.startswith("trainer.max_steps=")]
    probe = state_dump(out / dump)
    return run_script([*args, f"trainer.max_steps={max_steps}", *reference_schedule(), probe, *extra], timeout=400)


def shared_leg(run: Path) -> dict:
    """The first leg of a chain: a shared 2-process run up to its step-WORLD_SIZE_STEP checkpoint."""
    end = torch.load(run / "dump" / f"step{WORLD_SIZE_STEP}.pt", weights_only=False)
    assert (end["global_step"], end["world_size"]) == (WORLD_SIZE_STEP, 2), (end["global_step"], end["world_size"])
    own = {step: loss for step, loss in losses(run).items() if step < WORLD_SIZE_STEP}
    return {"end": end, "losses": own, "world": 2}


def resumed_leg(out: Path, dump: Path, stdout: str, start: int, world: int) -> dict:
    """A run that resumed in ``out``: its stdout, the state dumps at its start and end, its own logged
    losses, the step it started from and its world size."""
    dumps = {k: torch.load(dump / f"{k}.pt", weights_only=False) for k in ("start", "end")}
    own = _csv_losses(_csv_versions(out)[-1])
    # A resume with more accumulation must not save the step it resumed from again (as step*-v1.ckpt;
    # best-step*-val*.ckpt is a best checkpoint's own name).
    versioned = [p for p in (out / "checkpoints").iterdir() if re.search(r"-v\d+\.ckpt$", p.name)]
    assert not versioned, sorted(p.name for p in (out / "checkpoints").iterdir())
    return {"stdout": stdout, **dumps, "losses": own, "from": start, "world": world}


def resume_chain(data_dir: Path, out: Path, strategy: str, first: Path, worlds: list[int]) -> list[dict]:
    """The shared 2-process run ``first``'s step-WORLD_SIZE_STEP checkpoint, copied into ``out``
    (:func:`copy_resume_point`), resumed at each world size of ``worlds`` in turn in that folder (each
    leg from the previous one's ``last.ckpt``): one step each, the last leg to STEPS. Returns per leg,
    the shared run first: see :func:`shared_leg`, :func:`resumed_leg`."""
    copy_resume_point(first, out)
    runs, steps = [shared_leg(first)], WORLD_SIZE_STEP
    for i, world in enumerate(worlds):
        start, steps = steps, STEPS if i == len(worlds) - 1 else steps + 1
        proc = run_at(data_dir, out, strategy, world, steps, f"dump{i}")
        runs.append(resumed_leg(out, out / f"dump{i}", proc.stdout, start, world))
    return runs


def assert_same_state(saved: dict, loaded: dict, what: str) -> None:
    """Every tensor of the state after the load equals the one the checkpoint was saved from.
    Measured: bitwise equal for DDP, FSDP2 (DCP resharding) and ZeRO-2/3 (universal checkpoint)."""
    assert loaded["global_step"] == saved["global_step"], what
    for key in MOMENTS:
        assert saved[key], (what, key, "the saving run recorded no state")
        assert loaded[key].keys() == saved[key].keys(), (what, key)
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (what, key, name, (loaded[key][name] - tensor).abs().max())
    assert {float(s) for s in saved["step"].values()} == {float(saved["global_step"])}, what  # Adam counted each step


def assert_resumed_runs(runs: list[dict], strategy: str, reference: Path) -> None:
    ref = losses(reference)
    for run in runs:
        for step, loss in run["losses"].items():
            # Relative 1e-5; measured: DDP, FSDP2, ZeRO-2 equal to DDP's within 1e-6, ZeRO-3 at 1 rank
            # (accumulation 2) 2.0e-5 absolute, 1.9e-6 relative (its partitioned gradients sum in
            # another order). A resume at the wrong data position was off by 4e-3 or more.
            assert abs(loss - ref[step]) < 1e-5 * abs(ref[step]), (strategy, run["world"], step, loss, ref[step])
    for before, after in zip(runs, runs[1:]):
        what = f"{strategy}: {before['world']} -> {after['world']} ranks"
        assert_same_state(before["end"], after["start"], what)
        assert after["start"]["world_size"] == after["world"], what
        # It really continued: its own log starts at the saved step (the progress line's step s+1).
        assert min(after["losses"]) == after["from"] == before["end"]["global_step"], (what, sorted(after["losses"]))
        plural = "rank" if after["world"] == 1 else "ranks"
        line = f"resuming at {after['world']} {plural} from a checkpoint of {before['world']}: accumulation"
        accumulation = {1: 2, 2: 1}  # global batch 8, micro-batch 4
        assert f"{line} {accumulation[before['world']]} -> {accumulation[after['world']]}" in after["stdout"], what


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test pays for the shared runs
def test_ddp_checkpoint_resumes_at_another_world_size(ddp_run: Path, ddp_run_resumed_on_one_rank) -> None:
    out, stdout = ddp_run_resumed_on_one_rank  # ddp_run's step-4 file resumed by 1 process
    runs = [shared_leg(ddp_run), resumed_leg(out, out / "dump", stdout, WORLD_SIZE_STEP, 1)]
    assert_resumed_runs(runs, "ddp", ddp_run)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_fsdp_sharded_checkpoint_reshards_weights_and_adam_state(
    tiny_data_dir: Path, tmp_path: Path, ddp_run: Path, strategy_runs: dict[str, Path]
) -> None:
    runs = resume_chain(tiny_data_dir, tmp_path / "run", "fsdp", strategy_runs["fsdp"], [1, 2])
    assert_resumed_runs(runs, "fsdp", ddp_run)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_zero2_resumes_at_another_world_size_through_the_universal_checkpoint(
    tiny_data_dir: Path, tmp_path: Path, ddp_run: Path, strategy_runs: dict[str, Path]
) -> None:
    out = tmp_path / "run"
    runs = resume_chain(tiny_data_dir, out, "deepspeed_stage_2", strategy_runs["deepspeed_stage_2"], [1, 2])
    assert_resumed_runs(runs, "deepspeed_stage_2", ddp_run)
    for run in runs[1:]:
        assert "converted" in run["stdout"] and "universal checkpoint" in run["stdout"], run["world"]
    # The 2-rank run resumed the 1-rank run's last.ckpt through its conversion; its own save replaced
    # last.ckpt, and with it that conversion.
    assert not (out / "checkpoints" / "last.ckpt.universal").exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_zero3_resumes_at_another_world_size_and_back(
    tiny_data_dir: Path, tmp_path: Path, ddp_run: Path, strategy_runs: dict[str, Path]
) -> None:
    name = "deepspeed_stage_3"
    runs = resume_chain(tiny_data_dir, tmp_path / "run", name, strategy_runs[name], [1, 2])
    assert_resumed_runs(runs, name, ddp_run)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


# --- refusals, before training: fabricated checkpoints of each format, no training needed --------------
def _shapes(**overrides: int) -> dict[str, tuple[int, ...]]:
    from cgpt.config import ModelConfig
    from cgpt.model import GPT

    config = ModelConfig.from_dict({**ModelConfig.from_name("cerebras-gpt-tiny").to_dict(), **overrides})
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


def fake_checkpoint(kind: str, folder: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A checkpoint of ``kind`` (``file``, ``fsdp``, ``deepspeed``) with ``shapes``' tensors as its
    format stores them (zeros; only names and shapes are read)."""
    state = {f"model.{k}": torch.zeros(s) for k, s in shapes.items() if k != "lm_head.weight"}
    if kind == "file":
        torch.save({"state_dict": state, "global_step": 2}, folder / "last.ckpt")
        return folder / "last.ckpt"
    path = folder / "last.ckpt"
    path.mkdir()
    if kind == "fsdp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
        torch.save({"global_step": 2}, path / "meta.pt")
        return path
    (path / "latest").write_text("checkpoint")
    (path / "checkpoint").mkdir()
    param_shapes = [{k: v.shape for k, v in state.items()}]
    torch.save({"param_shapes": param_shapes, "global_step": 2}, path / "checkpoint" / "mp_rank_00_model_states.pt")
    for rank in range(2):
        (path / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return path


@pytest.mark.parametrize("kind, strategy", [("file", "ddp"), ("fsdp", "fsdp"), ("deepspeed", "deepspeed")])
def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_tensor(
    kind: str, strategy: str, tmp_path: Path
) -> None:
    from cgpt.weights import checkpoint_world_size

    ckpt = fake_checkpoint(kind, tmp_path, _shapes())
    check_resume(ckpt, strategy, _shapes())  # the same model: accepted
    assert checkpoint_world_size(ckpt) == {"file": None, "fsdp": 1, "deepspeed": 2}[kind]
    with pytest.raises(ResumeError) as err:
        check_resume(ckpt, strategy, _shapes(d_model=128, n_head=2, d_ffn=512))
    message = str(err.value)
    assert "transformer.wte.weight is [50257, 64] in the checkpoint but [50257, 128]" in message, message
    assert "another model shape" in message and "init_from" in message, message


@pytest.mark.parametrize(
    "kind, strategy, advice",
    [
        ("deepspeed", "fsdp", ["train/consolidate.py", "strategy=deepspeed_stage_1|2|3", "Adam moments restart"]),
        ("deepspeed", "ddp", ["train/consolidate.py", "strategy=deepspeed_stage_1|2|3"]),
        ("fsdp", "deepspeed", ["train/consolidate.py", "strategy=fsdp"]),
        ("fsdp", "auto", ["train/consolidate.py", "strategy=fsdp"]),
        ("file", "deepspeed", ["strategy=ddp or strategy=fsdp", "init_from="]),
    ],
)
def test_a_checkpoint_of_another_strategy_family_is_refused_saying_how_to_convert(
    kind: str, strategy: str, advice: list[str], tmp_path: Path
) -> None:
    ckpt = fake_checkpoint(kind, tmp_path, _shapes())
    with pytest.raises(ResumeError) as err:
        check_resume(ckpt, strategy, _shapes())
    for words in advice:
        assert words in str(err.value), (words, str(err.value))


@pytest.mark.slow  # one process that stops before training: a few seconds
def test_the_refusal_comes_before_training_from_the_command_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    fake_checkpoint("deepspeed", out / "checkpoints", _shapes())
    args = [*pretrain_args(tiny_data_dir, out, "fsdp", 1), "fused_loss=false"]  # no LM-head timing
    with pytest.raises(AssertionError) as err:  # run_script: a non-zero exit, with the run's output
        run_script(args, timeout=300)
    assert "is a DeepSpeed checkpoint folder, which strategy=fsdp cannot read" in str(err.value)
    assert "training cerebras-gpt" not in str(err.value)  # refused before the fit started
    assert not list(out.rglob("metrics.csv")) and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.ckpt"
    ]
