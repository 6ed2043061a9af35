"""Weighted mixtures of prepared folders: the config check and the slot plan.

A mixture is a list of sources ``{name, dir, weight}`` (each a folder made by ``data/prepare.py``)
and optional weight changes ``[{step, weights: {name: w}}]``. A weight is a share of the training
*tokens*; every source has the same sequence length, so it is also a share of the samples.

:class:`MixturePlan` says, for global batch ``b`` (one optimizer step, ``G`` sample slots), how
many slots each source gets. It carries every source's error from batch to batch: the slots of
batch ``b`` are the whole part of what the source is owed (its cumulative target minus what it got
so far), and the slots left over go to the largest remainders. So over *any* prefix of the run the
samples a source got stay within one of its target ``sum_b G * w_s(b)`` (strictly within one while
the weights stay put; see docs/design/data-mixtures.md for the bound across a weight change). The
plan depends only on (weights, schedule, G): not on ranks, workers, or where a run was resumed.

:meth:`MixturePlan.ledger` gives the samples and epochs per source after any number of batches,
for an exact resume and for ``summary.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cgpt.config import ConfigError


@dataclass(frozen=True)
class MixtureSource:
    """One prepared folder of a mixture and its share of the training tokens (any positive scale:
    weights are normalised over the mixture)."""

    name: str
    dir: str
    weight: float = 1.0
    shard_url: str | None = None  # where its shards live (``{name}``: the file name); None: in ``dir``


@dataclass(frozen=True)
class WeightChange:
    """From optimizer step ``step`` on, the sources get ``weights`` (names not listed: 0)."""

    step: int
    weights: Mapping[str, float]


def parse_mixture(
    sources: Sequence[Mapping[str, Any]] | None,
    schedule: Sequence[Mapping[str, Any]] | None = None,
    data_dir: str | None = None,
) -> tuple[list[MixtureSource], list[WeightChange]]:
    """The mixture a data config describes: ``data.sources`` (+ ``data.schedule``), or ``data.dir``
    alone as a one-source mixture named after its folder.

    Raises :class:`~cgpt.config.ConfigError` saying what to fix: both or neither of ``dir`` and
    ``sources``, a source without a name or dir, duplicate names, a negative or non-finite weight,
    weights summing to zero, or a schedule entry with an unknown name, a bad step or zero weights.
    """
    if sources and data_dir:
        raise ConfigError(
            "data.dir and data.sources are both set: use data.dir for one prepared folder or data.sources for a "
            "mixture (then set data.dir=null)"
        )
    if not sources:
        if schedule:
            raise ConfigError("data.schedule needs data.sources: name the sources whose weights it changes")
        if not data_dir:
            raise ConfigError("no training data: set data.dir (one prepared folder) or data.sources (a mixture)")
        return [MixtureSource(Path(data_dir).name or "data", str(data_dir), 1.0)], []
    parsed: list[MixtureSource] = []
    for i, s in enumerate(sources):
        if not isinstance(s, Mapping) or not s.get("name") or not s.get("dir"):
            raise ConfigError(f"data.sources[{i}] = {s!r}: each source needs a name, a dir and a weight")
        weight = _weight(s.get("weight", 1.0), f"data.sources[{i}] ({s['name']})")
        url = s.get("shard_url")
        if url is not None and "{name}" not in str(url):
            raise ConfigError(
                f"data.sources[{i}] ({s['name']}): shard_url {url!r} has no {{name}}; write where each shard "
                "lives with {name} for its file name, e.g. 'pipe:aws s3 cp s3://bucket/web/{name} -'"
            )
        parsed.append(MixtureSource(str(s["name"]), str(s["dir"]), weight, None if url is None else str(url)))
    names = [s.name for s in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"data.sources: duplicate source name(s) {duplicates}; give each source its own name")
    if not sum(s.weight for s in parsed) > 0:
        raise ConfigError(f"data.sources: the weights {[s.weight for s in parsed]} sum to zero; give a source weight")
    changes: list[WeightChange] = []
    for i, entry in enumerate(schedule or ()):
        where = f"data.schedule[{i}]"
        if not isinstance(entry, Mapping) or "step" not in entry or not isinstance(entry.get("weights"), Mapping):
            raise ConfigError(f"{where} = {entry!r}: each entry needs a step and weights: {{name: weight, ...}}")
        step = entry["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"{where}: step must be an optimizer step >= 0, got {step!r}")
        unknown = sorted(set(map(str, entry["weights"])) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown source name(s) {unknown}; the sources are {names}")
        weights = {str(k): _weight(v, f"{where} ({k})") for k, v in entry["weights"].items()}
        if not sum(weights.values()) > 0:
            raise ConfigError(f"{where}: the weights {weights} sum to zero; give a source weight")
        if changes and step <= changes[-1].step:
            raise ConfigError(f"{where}: steps must increase ({changes[-1].step} then {step})")
        changes.append(WeightChange(step, weights))
    return parsed, changes


def _weight(value: Any, where: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: weight {value!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{where}: weight {value!r} must be a finite number >= 0")
    return w


def check_source_folders(sources: Sequence[MixtureSource]) -> list[Any]:
    """Every source's :class:`~cgpt.data.shards.DatasetMeta`, after checking that its folder and
    meta.json exist and that all sources share one tokenizer and sequence length (a batch mixes
    their samples). Raises :class:`~cgpt.config.ConfigError` naming the source and the fix."""
    from cgpt.data.shards import DatasetMeta

    metas = []
    for s in sources:
        if not Path(s.dir).is_dir():
            raise ConfigError(f"data source {s.name!r}: folder {s.dir} not found; prepare it with data/prepare.py")
        if not (Path(s.dir) / "meta.json").is_file():
            raise ConfigError(
                f"data source {s.name!r}: {s.dir} has no meta.json (preparation unfinished?); "
                f"re-run data/prepare.py --out {s.dir}"
            )
        metas.append(DatasetMeta.load(s.dir))
    first, m0 = sources[0], metas[0]
    for s, m in zip(sources[1:], metas[1:], strict=True):
        if m.tokenizer != m0.tokenizer or m.vocab_size != m0.vocab_size:
            raise ConfigError(
                f"data sources {first.name!r} and {s.name!r} use different tokenizers ({m0.tokenizer}/{m0.vocab_size} "
                f"vs {m.tokenizer}/{m.vocab_size}); prepare every source with the same tokenizer"
            )
        if m.seq_len != m0.seq_len:
            raise ConfigError(
                f"data sources {first.name!r} and {s.name!r} have sequence lengths {m0.seq_len} and {m.seq_len}; "
                f"prepare every source with the same --seq-len"
            )
    return metas


@dataclass(frozen=True)
class Ledger:
    """Where every source stands after some global batches: samples served, whole epochs finished
    and the position in the current epoch (arrays in source order)."""

    names: tuple[str, ...]
    samples: np.ndarray
    epochs: np.ndarray
    position: np.ndarray

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            n: {"samples": int(s), "epochs": int(e), "position": int(p)}
            for n, s, e, p in zip(self.names, self.samples, self.epochs, self.position, strict=True)
        }


class MixturePlan:
    """Slots per source in every global batch of ``global_batch`` samples.

    Args:
        names: the sources, in order (slot blocks follow it).
        weights: their initial weights (normalised here).
        global_batch: sample slots per global batch (one optimizer step).
        schedule: weight changes, each from an optimizer step on.
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[float],
        global_batch: int,
        schedule: Sequence[WeightChange] = (),
    ) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if len(names) != len(weights) or not names:
            raise ValueError("one weight per source, and at least one source")
        self.names = tuple(names)
        self.global_batch = global_batch
        index = {n: i for i, n in enumerate(self.names)}
        self._steps = [0] + [c.step for c in schedule]
        rows = [np.asarray(weights, dtype=np.float64)]
        for c in schedule:
            row = np.zeros(len(names))
            for n, w in c.weights.items():
                row[index[n]] = w
            rows.append(row)
        self._weights = np.stack([r / r.sum() for r in rows])  # (changes + 1, S), rows sum to 1
        # cumulative slots per source at the end of each computed batch, and the float targets
        self._counts = np.zeros((0, len(names)), dtype=np.int64)
        self._targets = np.zeros((0, len(names)), dtype=np.float64)

    @classmethod
    def from_sources(
        cls, sources: Sequence[MixtureSource], global_batch: int, schedule: Sequence[WeightChange] = ()
    ) -> MixturePlan:
        """The plan of a parsed mixture (:func:`parse_mixture`)."""
        return cls([s.name for s in sources], [s.weight for s in sources], global_batch, schedule)

    def weights_at(self, batch: int) -> np.ndarray:
        """The normalised weights in force for global batch ``batch`` (= optimizer step)."""
        return self._weights[np.searchsorted(self._steps, batch, side="right") - 1]

    def _extend(self, n_batches: int) -> None:
        """Compute the plan up to ``n_batches`` batches (error carrying, one batch at a time)."""
        done = len(self._counts)
        if n_batches <= done:
            return
        n_batches = max(n_batches, 2 * done, done + 1024)  # in chunks: a stream asks one batch further each time
        G, S = self.global_batch, len(self.names)
        index = np.searchsorted(self._steps, np.arange(done, n_batches), side="right") - 1
        # the cumulative target: an exact running sum (float64 holds it exactly far past any run)
        start = self._targets[-1] if done else np.zeros(S)
        targets = start + np.cumsum(G * self._weights[index], axis=0)
        counts = np.empty((n_batches - done, S), dtype=np.int64)
        have = self._counts[-1].copy() if done else np.zeros(S, dtype=np.int64)
        order = np.arange(S)
        for k in range(n_batches - done):
            owed = targets[k] - have  # what each source is owed; sums to G
            slots = np.maximum(np.floor(owed), 0).astype(np.int64)
            left = G - int(slots.sum())
            residual = owed - slots
            if left > 0:  # the largest remainders get one more (ties: the earlier source)
                slots[np.lexsort((order, -residual))[:left]] += 1
            elif left < 0:  # only after a weight change left some sources over-served
                rank = np.lexsort((order, residual))
                take = [i for i in rank if slots[i] > 0][:-left]
                slots[take] -= 1
            have = have + slots
            counts[k] = have
        self._counts = np.concatenate([self._counts, counts])
        self._targets = np.concatenate([self._targets, targets])

    def slots(self, batch: int) -> np.ndarray:
        """Slots per source (summing to ``global_batch``) in global batch ``batch``."""
        self._extend(batch + 1)
        before = self._counts[batch - 1] if batch else 0
        return self._counts[batch] - before

    def blocks(self, batch: int) -> list[tuple[str, int, int]]:
        """Global batch ``batch`` as ``(source, first slot, end slot)`` blocks in source order (empty
        blocks left out): the layout a stream fills, rank ``r`` of ``W`` taking slots
        ``[r * G / W, (r + 1) * G / W)``."""
        out, at = [], 0
        for name, n in zip(self.names, self.slots(batch).tolist(), strict=True):
            if n:
                out.append((name, at, at + n))
                at += n
        return out

    def consumed(self, n_batches: int) -> np.ndarray:
        """Samples per source in the first ``n_batches`` global batches."""
        if n_batches <= 0:
            return np.zeros(len(self.names), dtype=np.int64)
        self._extend(n_batches)
        return self._counts[n_batches - 1].copy()

    def targets(self, n_batches: int) -> np.ndarray:
        """The exact (fractional) samples per source the weights ask for in ``n_batches`` batches."""
        if n_batches <= 0:
            return np.zeros(len(self.names))
        self._extend(n_batches)
        return self._targets[n_batches - 1].copy()

    def ledger(self, n_batches: int, epoch_samples: Sequence[int]) -> Ledger:
        """Samples, finished epochs and position in the current epoch of every source after
        ``n_batches`` global batches, given each source's samples per epoch."""
        size = np.asarray(epoch_samples, dtype=np.int64)
        if size.shape != (len(self.names),) or (size <= 0).any():
            raise ValueError(f"epoch_samples needs one positive count per source, got {list(epoch_samples)}")
        samples = self.consumed(n_batches)
        return Ledger(self.names, samples, samples // size, samples % size)
