"""--max-doc-chars: long documents are cut at blank lines into several, nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

from cgpt.data.prepare import prepare
from cgpt.data.sources import split_long_documents


def _docs(pieces: list[tuple[str, bool]]) -> list[str]:
    out, cur = [], ""
    for text, last in pieces:
        cur += text
        if last:
            out.append(cur)
            cur = ""
    return out


def test_documents_are_cut_at_blank_lines_after_the_limit_and_rejoin_exactly() -> None:
    play = "".join(f"Scene {i}.\nA line of verse, and another.\n\n" for i in range(40))
    stream = [(play[:500], False), (play[500:], True), ("a short poem\n", True)]
    out = list(split_long_documents(stream, max_chars=200))
    docs = _docs(out)
    assert "".join(docs) == play + "a short poem\n"  # nothing lost or duplicated
    assert len(docs) > 5 and docs[-1] == "a short poem\n"
    for d in docs[:-2]:
        assert d.endswith("\n\n") and len(d) >= 200  # cut at a paragraph break past the limit
        assert len(d) < 200 + 50  # ... the first one
    assert list(split_long_documents(stream, max_chars=10**9)) == stream  # long limit: unchanged


def test_prepare_validation_samples_passages_from_every_work(tmp_path: Path) -> None:
    works = [{"text": "".join(f"{name} speaks line {i}.\n\n" for i in range(300))} for name in "ABCD"]
    src = tmp_path / "works.jsonl"
    src.write_text("".join(json.dumps(w) + "\n" for w in works))
    whole = prepare([str(src)], tmp_path / "whole", seq_len=16, val_every=4, log=lambda m: None)
    split = prepare([str(src)], tmp_path / "split", seq_len=16, val_every=4, max_doc_chars=500, log=lambda m: None)
    assert whole.splits["val"]["documents"] == 1  # one whole work held out
    assert split.splits["val"]["documents"] > 4  # passages from all works
    assert split.extra["max_doc_chars"] == 500
    speakers = {_val_text(tmp_path / d).count(f"{n} speaks") > 0 for d in ("whole", "split") for n in "ABCD"}
    assert [_val_text(tmp_path / "split").count(f"{n} speaks") > 0 for n in "ABCD"] == [True] * 4
    assert [_val_text(tmp_path / "whole").count(f"{n} speaks") > 0 for n in "ABCD"].count(True) == 1
    assert speakers == {True, False}


def _val_text(folder: Path) -> str:
    import tarfile

    import numpy as np

    from cgpt.data.tokenizer import get_tokenizer

    ids: list[int] = []
    for shard in sorted(folder.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                ids.extend(np.frombuffer(tar.extractfile(m).read(), dtype="<u2").tolist())
    return get_tokenizer().decode(ids)
