"""data/prepare.py: packing loses no token, shards decode back to the input text, inputs of every
kind, byte-identical output, split by document, atomic shards, per-shard counts, progress."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from cgpt.data import shards as shards_mod
from cgpt.data.prepare import prepare
from cgpt.data.shards import DatasetMeta, read_shard
from cgpt.data.sources import DataSourceError, iter_text_pieces
from cgpt.data.tokenizer import get_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def docs() -> list[str]:
    with gzip.open(CORPUS, "rt") as f:
        works = [json.loads(line)["text"] for _, line in zip(range(2), f)]
    # a dozen documents of varied length, cut from real text at line ends
    lines = "\n".join(works).splitlines(keepends=True)
    out, i = [], 0
    for n in (3, 40, 1, 120, 7, 60, 15, 2, 90, 30, 5, 50):
        out.append("".join(lines[i : i + n]))
        i += n
    return out


def _write_inputs(root: Path, docs: list[str]) -> dict[str, list[str]]:
    """The same documents as a folder of .txt, .jsonl, .jsonl.gz and .jsonl.zst (zstandard, the ``zst``
    extra, is a dev dependency: never replaced by another format)."""
    import zstandard

    (root / "txt").mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / "txt" / f"doc{i:03d}.txt").write_text(d)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (root / "all.jsonl").write_text(lines)
    with gzip.open(root / "all.jsonl.gz", "wt") as f:
        f.write(lines)
    zst = root / "all.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return {
        "folder": [str(root / "txt")],
        "glob": [str(root / "txt" / "doc*.txt")],
        "jsonl": [str(root / "all.jsonl")],
        "gz": [str(root / "all.jsonl.gz")],
        "zst": [str(zst)],
    }


def _prepare(inputs: list[str], out: Path, **kw) -> DatasetMeta:
    kw = {"seq_len": SEQ, "val_every": 4, "shard_size_mb": 0.02, "log": lambda m: None, **kw}
    return prepare(inputs, out, **kw)


def _samples(out: Path, meta: DatasetMeta, split: str) -> np.ndarray:
    rows = [read_shard(str(out / s["name"]), meta.sample_len, s["samples"], s["crc32"]) for s in meta.shards(split)]
    return np.concatenate(rows)


def test_packing_loses_no_token_and_decodes_to_the_input(docs: list[str], tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", docs)
    meta = _prepare(inputs["jsonl"], tmp_path / "out")
    tok = get_tokenizer()
    for split, mine in (("train", [d for i, d in enumerate(docs) if i % 4 != 3]), ("val", docs[3::4])):
        stream = [t for d in mine for t in [*tok.encode(d), tok.eos_id]]
        samples = _samples(tmp_path / "out", meta, split)
        assert (samples[1:, 0] == samples[:-1, -1]).all()  # consecutive samples share one token
        rebuilt = np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).tolist()
        info = meta.splits[split]
        assert info["tokens"] == len(stream) and info["documents"] == len(mine)
        assert len(stream) - len(rebuilt) == info["dropped_tokens"] < SEQ  # only the tail is dropped
        assert rebuilt == stream[: len(rebuilt)]  # packing loses no token and keeps the order
        texts = tok.decode(rebuilt).split("<|endoftext|>")
        assert texts[:-1] == mine[: len(texts) - 1]  # the shards decode back to the documents
        assert mine[len(texts) - 1].startswith(texts[-1])
        assert info["samples"] == sum(s["samples"] for s in info["shards"]) == len(samples)
        assert sum(s["tokens"] for s in info["shards"]) == info["samples"] * SEQ


def test_every_input_kind_gives_identical_shards(docs: list[str], tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", docs)
    outputs = {}
    for kind, paths in inputs.items():
        meta = _prepare(paths, tmp_path / kind)
        outputs[kind] = {s["name"]: (tmp_path / kind / s["name"]).read_bytes() for s in meta.shards("train")}
        assert len(outputs[kind]) > 3  # several shards of the chosen size
        for s in meta.shards("train"):
            data = outputs[kind][s["name"]]
            assert len(data) == s["bytes"] <= 0.02 * 2**20 and zlib.crc32(data) == s["crc32"]
    assert all(o == outputs["jsonl"] for o in outputs.values())


def test_same_input_same_bytes_anywhere(docs: list[str], tmp_path: Path) -> None:
    a = _write_inputs(tmp_path / "a" / "deep", docs)
    b = _write_inputs(tmp_path / "b", docs)
    _prepare(a["gz"], tmp_path / "out1")
    _prepare(b["gz"], tmp_path / "out2")
    _prepare(b["gz"], tmp_path / "out2")  # re-running in place changes nothing either
    names = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for n in names:  # meta.json included: it holds no machine-specific path
        assert (tmp_path / "out1" / n).read_bytes() == (tmp_path / "out2" / n).read_bytes(), n
    assert str(tmp_path) not in (tmp_path / "out1" / "meta.json").read_text()


def test_long_text_is_tokenized_in_identical_pieces(docs: list[str]) -> None:
    text = "\n\n".join(docs)
    tok = get_tokenizer()
    for piece_chars in (61, 500):
        pieces = list(iter_text_pieces(io.StringIO(text), piece_chars))
        assert len(pieces) > 10 and "".join(pieces) == text
        assert [i for p in tok.encode_batch(pieces) for i in p] == tok.encode(text)


def test_a_big_txt_document_streams_in_pieces(docs: list[str], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(docs))
    (tmp_path / "in" / "b.txt").write_text("\n".join(docs[::-1]))
    inputs = [str(tmp_path / "in")]
    whole = _prepare(inputs, tmp_path / "whole", val_every=2, piece_chars=1 << 24)
    pieces = _prepare(inputs, tmp_path / "pieces", val_every=2, piece_chars=200, batch_chars=1000)
    assert whole.splits["train"]["documents"] == whole.splits["val"]["documents"] == 1
    assert pieces.splits == whole.splits  # same documents, same tokens, same shards


def test_interrupted_run_leaves_no_valid_looking_shard_and_rerun_finishes(
    docs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _write_inputs(tmp_path / "in", docs)["jsonl"]
    clean = _prepare(inputs, tmp_path / "clean")
    real_close, closed = shards_mod.ShardWriter._close, []

    def crash_on_third(self) -> None:
        if len(closed) == 2:
            self._tar.fileobj.flush()
            raise KeyboardInterrupt  # killed while writing the third shard
        closed.append(1)
        real_close(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "_close", crash_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _prepare(inputs, out)
    monkeypatch.undo()
    assert not (out / "meta.json").exists()  # the folder does not pass as a dataset
    partial = sorted(p.name for p in out.iterdir())
    assert len([p for p in partial if p.endswith(".tar")]) == 2 and any(p.endswith(".tar.tmp") for p in partial)
    for p in out.glob("*.tar"):  # every shard under its final name is complete
        assert p.read_bytes() == (tmp_path / "clean" / p.name).read_bytes()
    with pytest.raises(FileNotFoundError, match="prepare"):
        DatasetMeta.load(out)
    meta = _prepare(inputs, out)  # the re-run finishes the job
    assert meta.splits == clean.splits and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())


def test_progress_lines_and_bad_inputs(docs: list[str], tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", docs)["zst"]
    lines: list[str] = []
    _prepare(inputs, tmp_path / "out", log=lines.append, progress_every=0.0, batch_chars=2000)
    assert any("% of input" in line and "tokens/s" in line for line in lines)
    assert "100.0%" in lines[-2] and lines[-1].startswith("prepare: wrote")
    with pytest.raises(DataSourceError, match="matches no file"):
        _prepare([str(tmp_path / "nowhere" / "*.txt")], tmp_path / "x")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataSourceError, match="bad.jsonl:2"):
        _prepare([str(tmp_path / "bad.jsonl")], tmp_path / "x")
    with pytest.raises(ValueError, match="fewer than one sample"):
        _prepare([str(tmp_path / "in" / "txt" / "doc003.txt")], tmp_path / "x")


def test_cli_reports_errors_plainly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_cli", Path(__file__).parents[1] / "data" / "prepare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
