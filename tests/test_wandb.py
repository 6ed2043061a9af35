"""W&B logging: offline by default, one run per output folder (continued on re-run), and what a
training run logs, read back from the offline run files under <output_dir>/wandb."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from cgpt.loggers import RUN_ID_FILE, resolve_wandb_mode, wandb_logger


def read_records(path: Path) -> list:
    """The protobuf records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-style log: 7-byte
    file header, 32 KiB blocks of records with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore file"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def summarize_run(run_dir: Path) -> dict:
    """run id/name/group, config keys and history keys -> values of an offline run folder."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    info: dict = {"config": {}, "history": {}}
    for r in read_records(wandb_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group)
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
        elif kind == "history":
            for i in r.history.item:
                info["history"].setdefault(i.key or "/".join(i.nested_key), []).append(json.loads(i.value_json))
    return info


def test_offline_without_credentials_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_one_run_id_per_output_folder_and_sweep_point_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(name="exp", save_dir=str(tmp_path), group="exp", point=3)
    again = wandb_logger(name="exp", save_dir=str(tmp_path))
    other = wandb_logger(name="exp", save_dir=str(tmp_path / "other"))
    assert first.version == again.version == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert other.version != first.version
    assert first._wandb_init["name"] == "exp-3" and first._wandb_init["group"] == "exp"
    assert first._wandb_init["resume"] == "allow"


@pytest.mark.slow
def test_training_logs_config_metrics_and_sample_table(tiny_data_dir: Path, tmp_path: Path) -> None:
    from conftest import run_script

    out = tmp_path / "run"
    run_script(["train/pretrain.py", "experiment=smoke", f"data.dir={tiny_data_dir}", "logger=wandb",
                f"paths.output_dir={out}", "sample.max_new_tokens=4"], env={"WANDB_MODE": "offline"})  # fmt: skip
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    info = summarize_run(run_dir)
    assert info["id"] == (out / RUN_ID_FILE).read_text().strip() and run_dir.name.endswith(info["id"])
    assert info["name"] == "smoke" and info["group"] == "smoke"
    # The whole resolved config, not only the module's arguments.
    for key in ("model", "optim", "data", "trainer", "resolved", "seed", "run_name"):
        assert key in info["config"], key
    resolved = info["config"]["resolved"]
    assert resolved.get("value", resolved)["max_steps"] == 6
    h = info["history"]
    for key in ("train/loss", "val/loss", "lr", "tokens_seen", "tokens_per_sec", "mfu", "grad_norm"):
        assert key in h, f"{key} not logged; got {sorted(h)}"
    assert h["tokens_seen"][-1] > h["tokens_seen"][0] > 0
    assert all(0 < v < 1 for v in h["mfu"]) and all(v > 0 for v in h["tokens_per_sec"])
    # A table of samples, one row per validation so far (smoke validates at steps 3 and 6).
    table_dir = run_dir / "files" / "media" / "table"
    tables = sorted(table_dir.glob("samples_*.table.json"), key=lambda p: len(p.read_text()))
    assert len(tables) == 2
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "prompt", "sample"]
    assert [row[0] for row in last["data"]] == [3, 6] and all(row[1] == "ROMEO:" for row in last["data"])
