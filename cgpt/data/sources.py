"""Raw text inputs: files, folders and globs of .txt / .jsonl, optionally .gz or .zst compressed.

A ``.txt`` file is one document; every line of a ``.jsonl`` file is one document (its text field).
Everything streams: no file is read into memory whole, so inputs may be larger than RAM.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSIONS = ("", ".gz", ".zst")


class DataSourceError(ValueError):
    pass


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for comp in COMPRESSIONS:
        for suffix in TEXT_SUFFIXES:
            if name.endswith(suffix + comp):
                return "jsonl" if suffix in (".jsonl", ".json") else "txt"
    return None


def expand_inputs(inputs: list[str] | str) -> list[Path]:
    """Resolve files, folders (recursively) and glob patterns to a sorted, de-duplicated file list."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [str(inputs)]
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            matches = [f for f in sorted(p.rglob("*")) if f.is_file() and _kind(f)]
            if not matches:
                raise DataSourceError(f"folder {p} holds no .txt/.jsonl files (optionally .gz/.zst)")
        elif p.is_file():
            if _kind(p) is None:
                raise DataSourceError(f"{p}: unsupported input; use .txt or .jsonl, optionally .gz or .zst")
            matches = [p]
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True)) if _kind(Path(m))]
            if not matches:
                raise DataSourceError(f"input {item!r} matches no file: give a file, a folder or a glob")
        files.extend(matches)
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for streaming reads."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataSourceError(f"{path}: reading .zst needs `pip install zstandard`") from e
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_documents(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """Yield documents in file order. Empty documents are skipped."""
    for path in files:
        if _kind(path) == "txt":
            with open_text(path) as f:
                text = f.read()
            if text.strip():
                yield text
            continue
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise DataSourceError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
                if record[text_key].strip():
                    yield record[text_key]
