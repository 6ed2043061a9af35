"""The reproduction certificate (every preset against the published configs) and the 13B schedule."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, run_script

from cgpt.certificate import Row, certificate, format_certificate
from cgpt.config import TrainingDefaults
from cgpt.optim import SchedulerConfig, build_scheduler, resolve_schedule
from cgpt.planning import plan_cli
from cgpt.presets import CONTINUATIONS
from cgpt.published import PUBLISHED, PUBLISHED_CONTINUATIONS

PUBLISHED_PRESETS = {
    f"cerebras-gpt-{s}{m}" for s in ("111m", "256m", "590m", "1.3b", "2.7b", "6.7b", "13b") for m in ("", "-mup")
} - {"cerebras-gpt-6.7b-mup", "cerebras-gpt-13b-mup"}


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return certificate()


def test_every_published_preset_matches_field_by_field(rows: list[Row]) -> None:
    assert set(PUBLISHED) == PUBLISHED_PRESETS and len(PUBLISHED_PRESETS) == 12
    covered = {r.preset for r in rows}
    assert covered == PUBLISHED_PRESETS | {"cerebras-gpt-13b phase 2"}
    for preset in PUBLISHED_PRESETS:  # shape, eps, init, optimizer, schedule, batch, clipping (+ muP)
        fields = {r.field for r in rows if r.preset == preset}
        assert len(fields) >= (27 if preset.endswith("-mup") else 22), preset
    bad = [f"{r.preset} {r.field}: published {r.published!r}, cgpt {r.cgpt!r}" for r in rows if not r.match]
    assert not bad, "\n".join(bad)
    assert all(r.cgpt is not None for r in rows)


def _changed(value: object, tolerance: float | None) -> object:
    """A different published value: the smallest change the certificate must notice."""
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (_changed(value[0], tolerance), *value[1:])
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 1
    assert isinstance(value, float)
    return value + 3 * tolerance if tolerance is not None else value * (1 + 1e-9)


def test_any_changed_published_value_fails_its_row(rows: list[Row]) -> None:
    for r in rows:
        changed = Row(r.preset, r.field, _changed(r.published, r.tolerance), r.cgpt, r.source, r.tolerance)
        assert not changed.match, (r.preset, r.field)


def test_certificate_command_prints_the_table_and_fails_on_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plan_cli(["certificate=true"]) == 0
    out = capsys.readouterr().out
    assert "| cerebras-gpt-13b | decay_steps | 174081 | 174081 | yes |" in out
    assert "Where the sources disagree" in out and "muP init" in out
    monkeypatch.setitem(PUBLISHED["cerebras-gpt-590m"], "output_init_std", 0.003333)  # the old rounded value
    assert plan_cli(["certificate=true"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: cerebras-gpt-590m output_init_std" in out


def test_phase2_experiment_agrees_with_the_preset_table() -> None:
    exp = yaml.safe_load((REPO_ROOT / "conf/experiment/cerebras_gpt_13b_phase2.yaml").read_text())
    c = CONTINUATIONS["cerebras-gpt-13b"][0]
    assert c["resume_step"] == TrainingDefaults.from_name("13b").max_steps
    assert exp["data"]["global_batch_size"] == c["batch_size"]
    assert exp["scheduler"]["step_offset"] == c["schedule_step"] - c["resume_step"]
    assert exp["trainer"]["max_steps"] + exp["scheduler"]["step_offset"] == c["schedule_end"]
    assert (exp["scheduler"]["warmup_steps"], exp["scheduler"]["decay_steps"]) == (c["warmup_steps"], c["decay_steps"])
    # the re-base keeps the tokens: 57,000 x 720 sequences = 38,000 x 1080
    assert c["resume_step"] * 720 == c["schedule_step"] * c["batch_size"]


# --- the 13B schedule against ModelZoo's formulas ---------------------------------------------
def _modelzoo_lr(step: int, peak: float, end: float, warmup: int, decay: str, total_iters: int) -> float:
    """SequentialLR([LinearLR(0 -> peak, warmup), LinearLR | CosineDecayLR(peak -> end, total_iters)]),
    written from ModelZoo's scheduler docs (the decay's step clipped at total_iters)."""
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total_iters) / total_iters
    if decay == "linear":
        return peak + (end - peak) * t
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def _lr_at(schedule_lambda, peak: float, step: int) -> float:
    return peak * schedule_lambda(step)


def test_13b_schedule_matches_modelzoo_in_both_phases() -> None:
    rec = TrainingDefaults.from_name("13b")
    peak, end = rec.lr, rec.lr * rec.final_lr_ratio
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)

    s1 = resolve_schedule(SchedulerConfig(), rec, rec.max_steps)  # phase 1: the preset's defaults
    f1 = build_scheduler(opt, s1.warmup_steps, rec.max_steps, s1.decay, s1.final_lr_ratio, s1.decay_steps).lr_lambdas[0]
    for step in (0, 100, 254, 346, 10_000, 57_000):
        expected = _modelzoo_lr(step, peak, end, 254, "cosine", 174_081)
        assert _lr_at(f1, peak, step) == pytest.approx(expected, rel=1e-12, abs=1e-18), step
    assert _lr_at(f1, peak, 57_000) / peak == pytest.approx(0.78395, abs=1e-5)  # not 0.1: the cosine goes on

    exp = yaml.safe_load((REPO_ROOT / "conf/experiment/cerebras_gpt_13b_phase2.yaml").read_text())
    s2 = resolve_schedule(SchedulerConfig(**exp["scheduler"]), rec, exp["trainer"]["max_steps"])
    f2 = build_scheduler(
        opt, s2.warmup_steps, exp["trainer"]["max_steps"], s2.decay, s2.final_lr_ratio, s2.decay_steps, s2.step_offset
    ).lr_lambdas[0]
    for step in (57_000, 57_001, 100_000, 135_223):  # cgpt's global step; ModelZoo's is 19,000 less
        expected = _modelzoo_lr(step - 19_000, peak, end, 169, "cosine", 116_054)
        assert _lr_at(f2, peak, step) == pytest.approx(expected, rel=1e-12, abs=1e-18), step
    # one cosine in tokens: the re-based phase 2 starts where phase 1 stopped (to 5e-6 of the peak)
    assert _lr_at(f2, peak, 57_000) == pytest.approx(_lr_at(f1, peak, 57_000), rel=5e-6)
    assert _lr_at(f2, peak, 135_223) == pytest.approx(end, rel=1e-12)


def test_shortened_13b_run_keeps_the_schedule_proportions() -> None:
    rec = TrainingDefaults.from_name("13b")
    s = resolve_schedule(SchedulerConfig(), rec, 570)
    assert (s.warmup_steps, s.decay_steps) == (3, 1741)  # 254 and 174,081 scaled by 570 / 57,000, rounded
    other = resolve_schedule(SchedulerConfig(), TrainingDefaults.from_name("1.3b"), 1000)
    assert other.warmup_steps + other.decay_steps == 1000  # every other preset decays to its last step


# --- a resume that changes the global batch and re-bases the schedule -------------------------
def _lrs(out: Path) -> dict[int, float]:
    result: dict[int, float] = {}
    for version in sorted((out / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("lr"):
                    result[int(row["step"])] = float(row["lr"])
    return result


@pytest.mark.slow  # training subprocesses: make test runs it, make test-fast does not
def test_resume_with_new_batch_and_rebased_schedule_keeps_optimizer_state(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [
        "train/pretrain.py", "experiment=smoke", f"data.dir={tiny_data_dir}", f"paths.output_dir={out}",
        "data.num_workers=0", "trainer.precision=32-true", "sample=null", "logger=csv", "data.micro_batch_size=2",
        "trainer.validate_every_steps=100", "callbacks.checkpoint.every_n_steps=6", "optim.lr=1e-3",
    ]  # fmt: skip
    # phase 1: 6 steps of batch 4 on a 20-step linear decay (like the 13B, the run stops before its end)
    run_script([*common, "data.global_batch_size=4", "trainer.max_steps=6", "scheduler.warmup_steps=2",
                "scheduler.decay_steps=20", "scheduler.decay=linear"])  # fmt: skip
    # phase 2: batch 8, the step re-based 6 -> 3 (= 6 x 4 / 8), a new 8-step decay, to position 9
    run_script([*common, "data.global_batch_size=8", "trainer.max_steps=12", "scheduler.warmup_steps=1",
                "scheduler.decay_steps=8", "scheduler.decay=linear", "scheduler.step_offset=-3"])  # fmt: skip
    lrs = _lrs(out)
    assert sorted(lrs) == list(range(12))

    def linear(pos: int, warmup: int, span: int) -> float:
        return 1e-3 * (pos / warmup if pos < warmup else 1 - 0.9 * min(1.0, (pos - warmup) / span))

    for step in range(6):
        assert lrs[step] == pytest.approx(linear(step, 2, 20), rel=1e-6), step
    for step in range(6, 12):  # from the first resumed step on: the new schedule at the re-based position
        assert lrs[step] == pytest.approx(linear(step - 3, 1, 8), rel=1e-6), step
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {12.0}  # Adam's moments continued from phase 1, not restarted at the resume
    resolved = yaml.safe_load((out / "summary.json").read_text())["config"]["resolved"]
    assert resolved["global_batch_size"] == 8 and resolved["accumulate_grad_batches"] == 4


@pytest.mark.slow  # training subprocesses: make test runs it, make test-fast does not
def test_offset_on_a_fresh_run_is_refused_with_a_fix(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="step_offset=-3 puts step 0 at schedule position -3"):
        run_script(["train/pretrain.py", "experiment=smoke", f"data.dir={tiny_data_dir}",
                    f"paths.output_dir={tmp_path}", "data.num_workers=0", "trainer.precision=32-true", "sample=null",
                    "scheduler.step_offset=-3"])  # fmt: skip


def test_format_marks_mismatches() -> None:
    text = format_certificate([Row("p", "f", 1, 2, "src"), Row("p", "g", "a", "a", "src")])
    assert "| p | f | 1 | 2 | **NO** | src |" in text and "1 of 2 fields match" in text
    assert PUBLISHED_CONTINUATIONS["cerebras-gpt-13b"]["schedule_end"] == 116_223
