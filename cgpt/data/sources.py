"""Raw text inputs: files, folders and globs of .txt / .jsonl, optionally .gz or .zst compressed.

A ``.txt`` file is one document; every line of a ``.jsonl`` file is one document (its text field).
Everything streams: no file is read into memory whole, so inputs may be larger than RAM. A long
document comes out in pieces cut where GPT-2's pre-tokenizer would split anyway (after a newline
between non-space characters, else before a space), so tokenizing the pieces gives the same ids
as tokenizing the whole document. (Only a run of over ``2 * piece_chars`` characters with no
space or newline gets a hard cut, which may change the tokens at that one point.)
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
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


class _CountingReader(io.RawIOBase):
    """A binary file that remembers how many raw bytes were read (progress of compressed input)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = self._f.readinto(b)
        self.pos += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for streaming reads (see :func:`raw_position`)."""
    raw = _CountingReader(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        stream: IO[bytes] = gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb")
    elif name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - depends on the environment
            raw.close()
            raise DataSourceError(f"{path}: reading .zst needs `pip install zstandard`") from e
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    else:
        stream = io.BufferedReader(raw)
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    text._cgpt_raw = raw  # type: ignore[attr-defined]
    return text


def raw_position(f: IO[str]) -> int:
    """Raw (possibly compressed) bytes read so far from a file opened by :func:`open_text`."""
    raw = getattr(f, "_cgpt_raw", None)
    return raw.pos if raw is not None else 0


def _safe_cut(text: str, lo: int) -> int:
    """The last index >= lo where ``text`` can be cut without changing GPT-2 pre-tokenization, or -1.

    Cut after a ``\\n`` that sits between two non-space characters, else before a space that
    follows a non-space character and precedes one. Neither boundary is ever inside a pre-token.
    """
    i = text.rfind("\n", lo, len(text) - 1)
    while i > lo:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo, i)
    i = text.rfind(" ", lo, len(text) - 1)
    while i > lo:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo, i)
    return -1


def iter_text_pieces(f: IO[str], piece_chars: int) -> Iterator[str]:
    """Stream a text file as pieces of about ``piece_chars`` characters, cut at safe boundaries."""
    buf = ""
    while True:
        block = f.read(piece_chars)
        buf += block
        while len(buf) > 2 * piece_chars or (not block and buf):
            if not block and len(buf) <= 2 * piece_chars:
                yield buf
                buf = ""
                break
            cut = _safe_cut(buf, piece_chars // 2) if len(buf) > 1 else -1
            if cut <= 0:
                cut = 2 * piece_chars  # no safe boundary in a long run of text: a hard cut
            yield buf[:cut]
            buf = buf[cut:]
        if not block:
            return


def iter_documents(
    files: list[Path], text_key: str = "text", piece_chars: int = 1 << 16, progress: list[int] | None = None
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, last)`` pieces of documents in file order; ``last`` marks a document's end.

    Empty documents are skipped. Documents longer than ``2 * piece_chars`` come in several pieces
    (see :func:`iter_text_pieces`): a huge .txt never sits in memory whole, and the tokenizer's
    threads get pieces of similar size to share.
    ``progress``, when given, is updated in place to ``[files done, raw bytes of the current file]``.
    """
    for n, path in enumerate(files):
        with open_text(path) as f:
            if _kind(path) == "txt":
                pending: str | None = None
                started = False  # a piece with text was yielded: the document exists
                for piece in iter_text_pieces(f, piece_chars):
                    if pending is not None and (started or pending.strip()):
                        yield pending, False
                        started = True
                    elif pending is not None:
                        piece = pending + piece  # leading whitespace joins the first real piece
                    pending = piece
                    if progress is not None:
                        progress[:] = [n, raw_position(f)]
                if pending is not None and (started or pending.strip()):
                    yield pending, True
            else:
                for lineno, line in enumerate(f, 1):
                    if progress is not None and lineno % 1024 == 0:
                        progress[:] = [n, raw_position(f)]
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataSourceError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                        raise DataSourceError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
                    text = record[text_key]
                    if not text.strip():
                        continue
                    if len(text) <= 2 * piece_chars:
                        yield text, True
                        continue
                    pieces = list(iter_text_pieces(io.StringIO(text), piece_chars))
                    for i, piece in enumerate(pieces):
                        yield piece, i == len(pieces) - 1
        if progress is not None:
            progress[:] = [n + 1, 0]


def split_long_documents(pieces: Iterable[tuple[str, bool]], max_chars: int) -> Iterator[tuple[str, bool]]:
    """Cut documents longer than ``max_chars`` into several at paragraph breaks (blank lines).

    Works on the ``(text, last)`` stream of :func:`iter_documents`. A cut falls at the first blank
    line after ``max_chars`` characters of the current document, so no paragraph is split. Useful
    when the natural documents are few and long (a play, a book): the validation split, which is
    by document, then samples passages from every work instead of holding out whole works.
    """
    run = 0
    for text, last in pieces:
        start, cut_here = 0, False
        while True:
            budget = max(max_chars - run, 0)
            if len(text) - start <= budget:
                break
            cut = text.find("\n\n", start + budget)
            if cut < 0:
                break
            cut += 2
            yield text[start:cut], True
            start, run, cut_here = cut, 0, True
        rest = text[start:]
        if rest.strip() or (last and not cut_here):
            yield rest, last
            run = 0 if last else run + len(rest)
        elif last:
            run = 0
