"""Zero-shot tasks during training: the scores logged at a validation equal `train/evaluate.py --tasks`
on the checkpoint of the same step, in one process and split over two FSDP ranks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, train

from cgpt.config import ConfigError
from cgpt.zero_shot import ZeroShotEval

TASKS = [
    REPO_ROOT / "tests" / "data" / "tiny_multiple_choice.jsonl",
    REPO_ROOT / "tests" / "data" / "tiny_lambada.jsonl",
]
EVAL = f"eval.tasks=[{','.join(map(str, TASKS))}]"


def _logged_scores(out: Path) -> dict[int, dict[str, float]]:
    """eval/<task>/<metric> of every logged step, from the run's CSV log."""
    scores: dict[int, dict[str, float]] = {}
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("eval/") and v:
                    scores.setdefault(int(row["step"]), {})[k] = float(v)
    return scores


def _assert_equal_to_evaluate_py(out: Path, step: int, logged: dict[str, float]) -> None:
    from cgpt.cli.evaluate import main as evaluate

    ckpt = out / "checkpoints" / f"step{step:07d}.ckpt"
    ref = evaluate(["--model", str(ckpt), "--tasks", *map(str, TASKS)])["tasks"]
    expected = {f"eval/{t}/{k}": v for t, r in ref.items() for k, v in r.items() if k in ("acc", "acc_norm", "ppl")}
    assert set(logged) == set(expected)
    for k, v in expected.items():
        assert logged[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def _check_run(out: Path) -> None:
    logged = _logged_scores(out)
    # the validation after step 4 (the CSV row of a validation in training says 3) and the final one at 6
    assert len(logged) == 2, logged
    scores = dict(zip((4, 6), (logged[k] for k in sorted(logged)), strict=True))
    for step in (4, 6):
        _assert_equal_to_evaluate_py(out, step, scores[step])
    summary = json.loads((out / "summary.json").read_text())["zero_shot"]
    assert summary["step"] == 6 and summary["seconds"] > 0
    assert summary["tasks"]["tiny_multiple_choice"]["examples"] == 6
    assert summary["tasks"]["tiny_lambada"]["acc"] == scores[6]["eval/tiny_lambada/acc"]


@pytest.mark.slow
def test_in_loop_scores_equal_evaluate_py(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the same run also checks data.val_sources end to end (config -> loaders -> log -> summary):
    # the training folder again under another name, so its loss must equal val/loss
    val_sources = f"data.val_sources=[{{name: again, dir: {tiny_data_dir}}}]"
    proc = train(tiny_data_dir, out, "auto", 1, EVAL, val_sources)
    assert "step 4: zero-shot tiny_multiple_choice acc" in proc.stdout
    _check_run(out)
    assert "| again " in proc.stdout  # the progress line after a validation
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_per_source"]["again"] == pytest.approx(summary["val_loss"], rel=1e-6)
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        assert "val/loss/again" in next(csv.reader(f))


@pytest.mark.slow
def test_in_loop_scores_split_over_fsdp_ranks_equal_evaluate_py(tiny_data_dir: Path, tmp_path: Path) -> None:
    # 6 and 3 examples over 2 ranks: the ranks run different numbers of forward passes, which FSDP's
    # parameter gathers only survive if the lighter rank keeps step
    out = tmp_path / "run"
    val_sources = f"data.val_sources=[{{name: again, dir: {tiny_data_dir}}}]"  # per-source sums over 2 ranks too
    train(tiny_data_dir, out, "fsdp", 2, EVAL, "eval.batch_size=3", val_sources)
    _check_run(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_per_source"]["again"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_bad_eval_settings_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ZeroShotEval([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="must be >= 1"):
        ZeroShotEval([str(TASKS[0])], every_n_validations=0)
    with pytest.raises(ConfigError, match="same name"):
        ZeroShotEval([str(TASKS[0]), str(TASKS[0])])


def test_every_n_validations_counts_real_validations_and_survives_a_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import cgpt.zero_shot as zero_shot

    scored: list[int] = []
    monkeypatch.setattr(zero_shot, "score_tasks", lambda *a, **k: scored.append(trainer.global_step) or {})
    callback = ZeroShotEval([str(TASKS[0])], every_n_validations=2)
    trainer = SimpleNamespace(sanity_checking=True, global_step=0, is_global_zero=False)
    module = SimpleNamespace(model=None)
    callback.on_validation_epoch_end(trainer, module)  # the sanity check does not count
    trainer.sanity_checking = False
    for step in (10, 20, 30):
        trainer.global_step = step
        callback.on_validation_epoch_end(trainer, module)
    assert scored == [20]
    resumed = ZeroShotEval([str(TASKS[0])], every_n_validations=2)
    resumed.load_state_dict(callback.state_dict())  # 3 validations so far: the 4th scores
    trainer.global_step = 40
    resumed.on_validation_epoch_end(trainer, module)
    assert scored == [20, 40]
