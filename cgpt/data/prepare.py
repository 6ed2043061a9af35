"""Raw text -> tokenized, packed WebDataset shards, the Cerebras-GPT way.

Documents are tokenized with GPT-2 BPE (in parallel: ``tokenizers`` spreads each batch over all
cores, in a thread, while the main thread reads the next batch and packs the previous one),
each followed by EOS, concatenated, and cut into ``seq_len + 1``-token samples with no padding:
the leftover of one document carries into the next sample. Every ``val_every``-th document goes
to the validation split (a split by document). Only the final partial sample of each split is
dropped, and counted in ``meta.json``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cgpt.data.shards import META_NAME, TOKEN_DTYPE, DatasetMeta, ShardWriter
from cgpt.data.sources import expand_inputs, iter_documents, split_long_documents
from cgpt.data.tokenizer import get_tokenizer

SPLITS = ("train", "val")
TAR_HEADER_BYTES = 512


class SequencePacker:
    """Concatenates documents (each + EOS) and emits overlapping ``seq_len + 1`` windows."""

    def __init__(self, seq_len: int, sink: Callable[[np.ndarray], None]) -> None:
        self.seq_len = seq_len
        self.sink = sink
        self._buf = np.empty(0, dtype=TOKEN_DTYPE)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.tokens = 0  # stream length
        self.counts = np.zeros(2**16, dtype=np.int64)  # unigram counts, for the entropy baseline
        self.samples = 0
        self.documents = 0

    def add(self, ids: list[int], eos_id: int | None) -> None:
        """Append a document, or a piece of one: ``eos_id`` ends the document, None continues it."""
        arr = np.empty(len(ids) + (eos_id is not None), dtype=TOKEN_DTYPE)
        arr[: len(ids)] = ids
        if eos_id is not None:
            arr[-1] = eos_id
            self.documents += 1
        self._pending.append(arr)
        self._pending_len += len(arr)
        self.tokens += len(arr)
        if len(self._buf) + self._pending_len >= 64 * (self.seq_len + 1):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.concatenate(self._pending), minlength=len(self.counts))
        buf = np.concatenate([self._buf, *self._pending]) if self._pending else self._buf
        self._pending, self._pending_len = [], 0
        T = self.seq_len
        n = max(0, (len(buf) - 1) // T)
        for j in range(n):
            self.sink(buf[j * T : j * T + T + 1])
        self.samples += n
        self._buf = buf[n * T :].copy()  # keeps the shared boundary token

    def finish(self) -> int:
        """Flush; return the number of stream tokens that never become a target (the tail)."""
        self._flush()
        return max(0, len(self._buf) - 1)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the token frequencies: the loss of a model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _batched(pieces: Iterable[tuple[str, bool]], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _source_names(files: list[Path]) -> list[str]:
    """Input files relative to their common folder: meta.json stays free of machine paths."""
    if len(files) == 1:
        return [files[0].name]
    root = Path(os.path.commonpath([f.resolve() for f in files]))
    return [f.resolve().relative_to(root).as_posix() for f in files]


class _Progress:
    """Progress of a long preparation: an in-place line on a terminal, else a plain line every
    ``every`` seconds (log files, SLURM)."""

    def __init__(self, log: Callable[[str], None], total_bytes: int, tty: bool, every: float) -> None:
        self.log, self.total, self.tty, self.every = log, max(total_bytes, 1), tty, every
        self.start = self.last = time.time()

    def update(self, done_bytes: int, docs: int, chars: int, tokens: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < (1.0 if self.tty else self.every):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(done_bytes / self.total, 1.0)
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        line = (
            f"prepare: {100 * frac:5.1f}% of input | {docs:,} documents | {tokens / 1e6:,.1f}M tokens | "
            f"{chars / 1e6 / elapsed:.2f}M chars/s | {tokens / 1e6 / elapsed:.2f}M tokens/s | eta {eta / 60:.1f} min"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            self.log(line)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def prepare(
    inputs: list[str] | str,
    out_dir: str | os.PathLike,
    seq_len: int = 2048,
    val_every: int = 20,
    shard_size_mb: float = 64.0,
    text_key: str = "text",
    tokenizer_dir: str | None = None,
    log: Callable[[str], None] | None = None,
    batch_chars: int = 8 << 20,
    piece_chars: int = 1 << 16,
    progress_every: float = 30.0,
    max_doc_chars: int = 0,
) -> DatasetMeta:
    """Tokenize, pack and shard ``inputs`` into ``out_dir``; return the written metadata.

    Args:
        inputs: files, folders or globs of .txt / .jsonl (optionally .gz / .zst).
        out_dir: destination folder; ``meta.json`` is written last, so its presence marks a
            complete dataset. Re-running rewrites the shards atomically and finishes the job.
        seq_len: training sequence length (each sample holds ``seq_len + 1`` tokens).
        val_every: every ``val_every``-th document goes to the validation split.
        shard_size_mb: target shard size.
        text_key: the field holding the text in .jsonl records.
        tokenizer_dir: folder with the GPT-2 BPE files (default: the bundled ones).
        log: where progress and summary lines go (default: stderr).
        batch_chars: characters tokenized per parallel batch (the tokenizer spreads a batch's
            documents over all cores while the next batch is read).
        piece_chars: long documents are tokenized in pieces of about this many characters (cut
            where the result is identical to tokenizing the whole document).
        progress_every: seconds between progress lines when stderr is not a terminal.
        max_doc_chars: when > 0, documents longer than this are cut at blank lines into several
            (see :func:`cgpt.data.sources.split_long_documents`); 0 keeps documents whole.
    """
    tty = log is None and sys.stderr.isatty()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if seq_len <= 0 or val_every < 2:
        raise ValueError("seq_len must be positive and val_every at least 2")
    if shard_size_mb <= 0:
        raise ValueError("shard_size_mb must be positive")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)  # the folder is incomplete until meta.json returns
    for stale in out.glob("*.tmp"):
        stale.unlink()
    tok = get_tokenizer(tokenizer_dir)
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab {tok.vocab_size} does not fit the {TOKEN_DTYPE} token format")
    bytes_per_sample = (seq_len + 1) * TOKEN_DTYPE.itemsize + 2 * TAR_HEADER_BYTES
    per_shard = max(1, int(shard_size_mb * 2**20) // bytes_per_sample)
    writers = {s: ShardWriter(out, s, per_shard) for s in SPLITS}
    packers = {s: SequencePacker(seq_len, writers[s].write) for s in SPLITS}

    sizes = [f.stat().st_size for f in files]
    position = [0, 0]  # [files done, raw bytes read of the current file]
    progress = _Progress(log, sum(sizes), tty, progress_every)
    doc_index = chars = 0

    def pack(batch: list[tuple[str, bool]], encoded: list[list[int]]) -> None:
        nonlocal doc_index, chars
        for (text, last), ids in zip(batch, encoded, strict=True):
            chars += len(text)
            split = "val" if doc_index % val_every == val_every - 1 else "train"
            packers[split].add(ids, tok.eos_id if last else None)  # pieces stream through
            doc_index += last

    pieces = iter_documents(files, text_key, piece_chars=piece_chars, progress=position)
    if max_doc_chars > 0:
        pieces = split_long_documents(pieces, max_doc_chars)
    with ThreadPoolExecutor(max_workers=1) as encoder:  # tokenizes batch i+1 while batch i is packed
        pending: deque = deque()
        for batch in _batched(pieces, max_chars=batch_chars):
            pending.append((batch, encoder.submit(tok.encode_batch, [t for t, _ in batch])))
            if len(pending) > 1:
                done, future = pending.popleft()
                pack(done, future.result())
            progress.update(sum(sizes[: position[0]]) + position[1], doc_index,
                            chars, sum(p.tokens for p in packers.values()))  # fmt: skip
        while pending:
            done, future = pending.popleft()
            pack(done, future.result())
    progress.update(sum(sizes), doc_index, chars, sum(p.tokens for p in packers.values()), force=True)
    progress.close()

    splits = {}
    corpus_counts = sum(p.counts for p in packers.values())
    for s in SPLITS:
        dropped = packers[s].finish()
        shards = writers[s].finish()
        if not shards:
            have = packers[s].tokens
            raise ValueError(
                f"the {s} split got {packers[s].documents} documents ({have} tokens), fewer than one "
                f"sample of seq_len + 1 = {seq_len + 1} tokens. Add more text, lower --seq-len"
                + (", or lower --val-every" if s == "val" else "")
            )
        splits[s] = {
            "shards": shards,
            "samples": sum(x["samples"] for x in shards),
            "documents": packers[s].documents,
            "tokens": packers[s].tokens,
            "dropped_tokens": dropped,
            "unigram_entropy": unigram_entropy(packers[s].counts),
        }
        keep = {x["name"] for x in shards}
        for old in out.glob(f"{s}-*.tar"):
            if old.name not in keep:
                old.unlink()  # shards of an earlier, larger run of this folder
    meta = DatasetMeta(
        seq_len=seq_len,
        tokenizer=tok.name,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        splits=splits,
        extra={
            "sources": [{"name": n, "bytes": b} for n, b in zip(_source_names(files), sizes, strict=True)],
            "val_every": val_every,
            "max_doc_chars": max_doc_chars,
            "text_key": text_key,
            "unigram_entropy": unigram_entropy(corpus_counts),
        },
    )
    meta.save(out)
    log(
        f"prepare: wrote {out} in {time.time() - progress.start:.1f}s: "
        + ", ".join(f"{s} {splits[s]['samples']} samples / {len(splits[s]['shards'])} shards" for s in SPLITS)
    )
    return meta
