"""The on-disk format: WebDataset tar shards of packed token sequences, plus ``meta.json``.

Each sample is one tar member ``<key>.tokens`` holding ``seq_len + 1`` little-endian uint16 token
ids (inputs are ``[:-1]``, targets ``[1:]``). Consecutive samples overlap by one token, so every
token of the packed stream is a target exactly once. Shards are plain tar files: ``webdataset``,
``tar`` and any object store read them. Writes are atomic (temporary name, then rename) and
byte-deterministic (fixed mtime, owner and mode), so the same input gives identical shards.
``meta.json`` records each shard's samples, tokens, bytes and CRC-32; readers verify the CRC, so
a truncated or corrupted shard is detected, not trained on.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMAT = "cgpt-packed-v1"
SAMPLE_EXT = "tokens"
TOKEN_DTYPE = np.dtype("<u2")
META_NAME = "meta.json"
TAR_BLOCK = 512


class ShardFormatError(ValueError):
    pass


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardWriter:
    """Writes samples into numbered tar shards of at most ``samples_per_shard`` samples each."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int) -> None:
        if samples_per_shard <= 0:
            raise ValueError("samples_per_shard must be positive")
        self.out_dir = Path(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._tokens = 0
        self.total_samples = 0

    def write(self, tokens: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        data = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()
        info = tarfile.TarInfo(f"{self.total_samples:010d}.{SAMPLE_EXT}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._tokens += len(tokens) - 1
        self.total_samples += 1
        if self._count == self.samples_per_shard:
            self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def _close(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        data = self._tmp.read_bytes()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)  # atomic: a shard either exists complete or not at all
        self.shards.append(
            {
                "name": final.name,
                "samples": self._count,
                "tokens": self._tokens,
                "bytes": len(data),
                "crc32": zlib.crc32(data),
            }
        )
        self._tar, self._tmp, self._count, self._tokens = None, None, 0, 0

    def finish(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close()
        return self.shards


def iter_tar_samples(stream: IO[bytes], source: str, sample_len: int) -> Iterator[np.ndarray]:
    """Decode the token arrays of one shard read as a stream (works for pipes and URLs)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith("." + SAMPLE_EXT):
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != sample_len * TOKEN_DTYPE.itemsize:
                    raise ShardFormatError(
                        f"{source}: member {member.name} has {len(data)} bytes, expected "
                        f"{sample_len * TOKEN_DTYPE.itemsize} (seq_len + 1 = {sample_len} uint16 tokens)"
                    )
                yield np.frombuffer(data, dtype=TOKEN_DTYPE)
    except tarfile.TarError as e:
        raise ShardFormatError(f"{source}: corrupt or truncated tar ({e})") from e


def _sample_stride(sample_len: int) -> int:
    """Bytes one sample takes in a shard written by :class:`ShardWriter`: header + padded data."""
    return TAR_BLOCK + -(-sample_len * TOKEN_DTYPE.itemsize // TAR_BLOCK) * TAR_BLOCK


def _fast_decode(data: bytes, sample_len: int, samples: int) -> np.ndarray | None:
    """Decode a shard in :class:`ShardWriter`'s exact layout with array views (no per-member
    Python work); None when the bytes are laid out otherwise (then tarfile parses them)."""
    stride, nbytes = _sample_stride(sample_len), sample_len * TOKEN_DTYPE.itemsize
    end = samples * stride
    if samples <= 0 or len(data) < end + 2 * TAR_BLOCK:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    members = buf[:end].reshape(samples, stride)
    size_field = np.frombuffer(b"%011o\0" % nbytes, dtype=np.uint8)
    if not (
        (members[:, 257:262] == np.frombuffer(b"ustar", dtype=np.uint8)).all()
        and (members[:, 124:136] == size_field).all()
        and (members[:, 156] == ord("0")).all()
        and not buf[end : end + 2 * TAR_BLOCK].any()
    ):
        return None
    return members[:, TAR_BLOCK : TAR_BLOCK + nbytes].view(TOKEN_DTYPE)  # a read-only view of data


def read_shard(url: str, sample_len: int, samples: int | None = None, expected_crc32: int | None = None) -> np.ndarray:
    """All samples of one shard as a ``(samples, sample_len)`` uint16 array.

    ``url`` is a local path or anything ``webdataset.gopen`` opens (``pipe:CMD``, ``http(s)://``,
    ...). The shard is read whole (shards are tens of MB), checked against ``expected_crc32``, and
    decoded with array views when it has the writer's layout (``samples`` given), else by tarfile.
    Raises :class:`ShardFormatError` or ``OSError`` for unreadable shards.
    """
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(url, "rb") as stream:
            data = stream.read()
    else:
        data = Path(url).read_bytes()
    if expected_crc32 is not None and zlib.crc32(data) != expected_crc32:
        raise ShardFormatError(
            f"{url}: checksum mismatch ({len(data)} bytes): the shard is truncated or corrupt, or from "
            "another preparation than meta.json"
        )
    fast = _fast_decode(data, sample_len, samples) if samples is not None else None
    if fast is not None:
        return fast
    rows = list(iter_tar_samples(io.BytesIO(data), url, sample_len))
    if not rows:
        return np.empty((0, sample_len), dtype=TOKEN_DTYPE)
    return np.stack(rows)


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``: how the shards were made and what each holds."""

    seq_len: int
    tokenizer: str
    vocab_size: int
    eos_id: int
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    dtype: str = "uint16"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1

    def shards(self, split: str) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise ShardFormatError(f"split {split!r} not in meta.json (has {sorted(self.splits)})")
        return self.splits[split]["shards"]

    def save(self, directory: Path) -> None:
        tmp = Path(directory) / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, Path(directory) / META_NAME)

    @classmethod
    def load(cls, location: str | os.PathLike) -> DatasetMeta:
        """Read ``meta.json`` from a local folder (URL datasets pass a local copy of it)."""
        path = Path(location)
        path = path / META_NAME if path.is_dir() or not str(path).endswith(".json") else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the data folder is missing or its preparation did not finish. "
                "Run `python data/prepare.py --input <text> --out <dir>` (re-running resumes cleanly)."
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ShardFormatError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}; re-run data/prepare.py")
        return cls(**raw)
