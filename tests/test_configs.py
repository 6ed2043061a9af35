"""Every Hydra config composes, resolves and instantiates (lightning-hydra-template style)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from cgpt.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"


def _compose(tmp_path: Path, overrides: list[str]):
    os.environ.setdefault("CGPT_ROOT", str(REPO_ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"hydra.run.dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_option_builds_a_valid_config(tmp_path: Path, option: str) -> None:
    cfg = _compose(tmp_path, [f"model={option}"])
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
    assert model_cfg.name == cfg.model.name


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_composes(tmp_path: Path, option: str) -> None:
    cfg = _compose(tmp_path, [f"experiment={option}"])
    assert cfg.paths.output_dir == str(tmp_path)
    assert cfg.data.micro_batch_size > 0


@pytest.mark.parametrize("option", _options("logger"))
def test_every_logger_instantiates_offline(tmp_path: Path, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    from cgpt.training import instantiate as build  # what a run builds its logger with

    cfg = _compose(tmp_path, [f"logger={option}"])
    logger = build(OmegaConf.to_container(cfg.logger))
    if option == "none":
        assert logger is None  # the trainer gets no logger
        return
    expected = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "wandb": "WandbLogger"}[option]
    assert type(logger).__name__ == expected
    assert Path(logger.save_dir).resolve() == tmp_path.resolve()  # inside the run's output folder


def test_default_callbacks_instantiate(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, [])
    import lightning as L

    for name, c in cfg.callbacks.items():
        built = instantiate(c)
        assert isinstance(built, L.Callback), (name, built)
        if "dirpath" in c:  # checkpoints go to the run's folder
            assert Path(built.dirpath) == tmp_path / "checkpoints", (name, built.dirpath)


@pytest.mark.parametrize("group", ["optim", "scheduler", "trainer", "data", "paths", "strategy", "callbacks", "guard"])
def test_every_option_of_the_other_groups_composes(tmp_path: Path, group: str) -> None:
    import yaml

    for option in _options(group):
        cfg = _compose(tmp_path, [f"{group}={option}"])
        # The option's own values reach the composed config (interpolations are resolved elsewhere).
        own = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
        own.pop("defaults", None)
        composed = OmegaConf.to_container(cfg[group])
        for key, value in own.items():
            if "${" not in str(value):
                assert composed[key] == value, (group, option, key, composed[key], value)


def test_guard_options_and_the_watchdog_build(tmp_path: Path) -> None:
    from cgpt.guard import build_guard
    from cgpt.watchdog import build_watchdog

    for option, enabled in (("default", True), ("off", False)):
        cfg = OmegaConf.to_container(_compose(tmp_path, [f"guard={option}"]))
        assert (build_guard(cfg["guard"], str(tmp_path)) is not None) == enabled, option
    assert build_watchdog(cfg["watchdog"], str(tmp_path)).timeout_s == 1800
    assert build_watchdog(None, str(tmp_path)) is None


def test_paths_never_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _compose(tmp_path / "out", [])
    assert cfg.paths.root_dir == str(REPO_ROOT)
    assert cfg.data.dir.startswith(str(REPO_ROOT))
