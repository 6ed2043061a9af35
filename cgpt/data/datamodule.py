"""LightningDataModule over packed WebDataset shards: streaming, rank/worker-aware, resumable.

The training order is :mod:`cgpt.data.stream`'s global one, so the data position saved in a
checkpoint is one number (global batches consumed) plus what defines the order (seed, partitions,
mix_shards, global batch, a fingerprint of the shard list). A resume at another world size or
worker count continues with exactly the samples an uninterrupted run would have consumed next.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cgpt.data.mixture import MixturePlan
from cgpt.data.shards import DatasetMeta
from cgpt.data.stream import DEFAULT_PARTITIONS, MixtureStream, PackedStream, Shard
from cgpt.preemption import leave_signals_to_main_process

# File prefix: each rank appends a line per training micro-batch it consumes (global batch, keys).
TRACE_ENV = "CGPT_DATA_TRACE"
ORDER = "global-partitions-v1"  # the order a checkpoint's data position counts in


class PackedLoader(DataLoader):
    """A DataLoader that drops the placeholders of batches that needed an unreadable shard
    (``tokens`` None) after handing them to ``on_skip``, in the training process, so the order
    of the remaining batches is still independent of the number of workers. It makes each batch's
    ``sample_keys`` an int64 tensor of shape (B,) here (a list of ints crosses from the worker
    process for free; a second tensor would cost a shared-memory segment per batch)."""

    on_skip: Callable[[dict[str, Any]], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, dict) and batch.get("tokens", ()) is None:
                if self.on_skip is not None:
                    self.on_skip(batch)
                continue
            if isinstance(batch, dict) and isinstance(batch.get("sample_keys"), list):
                batch["sample_keys"] = torch.tensor(batch["sample_keys"], dtype=torch.int64)
            yield batch


class DataMismatchError(ValueError):
    """The prepared data does not fit the model or run (another tokenizer, vocab, seq_len)."""


class PackedDataModule(L.LightningDataModule):
    """Train/val loaders over the shards described by ``<data_dir>/meta.json``.

    Args:
        data_dir: folder with ``meta.json`` (and the shards, unless ``shard_url`` says otherwise).
        micro_batch_size: sequences per device per forward pass.
        num_workers: dataloader worker processes per rank (the batch order does not depend on it).
        seed: the run seed; the shuffle of every epoch derives from it.
        shard_url: optional template for where shards live, with ``{name}`` for the file name,
            e.g. ``pipe:aws s3 cp s3://bucket/pile/{name} -``. Any URL webdataset opens works.
        val_batches: cap on validation micro-batches per rank (``None``: the whole split).
        mix_shards: training samples are permuted within units of about this many shards' worth.
        partitions: canonical partitions of the training order (clipped to the global batch):
            the most ranks that each read only their own share of the data.
        global_batch_size: samples per optimizer step over all ranks (:meth:`set_global_batch`;
            default one micro-batch per rank).
        val_sources: more prepared folders, ``(name, dir)``, whose validation splits are scored
            separately at each validation (``val/loss/<name>``); validation then has one loader
            per folder, ``data_dir``'s first.
        mixture: the sources of a weighted mixture (:class:`cgpt.data.mixture.MixtureSource`, two or
            more; ``data_dir`` is the first one's): training draws from all of them by the plan of
            :mod:`cgpt.data.mixture`, and each source is validated on its own (``val/loss/<name>``).
        schedule: the mixture's weight changes (:class:`cgpt.data.mixture.WeightChange`).
    """

    def __init__(
        self,
        data_dir: str,
        micro_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shard_url: str | None = None,
        val_batches: int | None = None,
        mix_shards: int = 4,
        partitions: int = DEFAULT_PARTITIONS,
        global_batch_size: int | None = None,
        val_sources: Sequence[tuple[str, str]] = (),
        mixture: Sequence[Any] = (),
        schedule: Sequence[Any] = (),
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shard_url = shard_url
        self.val_batches = val_batches
        self.mix_shards = mix_shards
        self.partitions = partitions
        self.global_batch_size = global_batch_size
        self.meta = DatasetMeta.load(self.data_dir)
        self.val_sources = [(str(name), str(folder)) for name, folder in val_sources]
        self.mixture = list(mixture) if len(mixture) > 1 else []
        self.schedule = list(schedule)
        # the folders validation reads, in loader order: (name or None for data_dir alone, folder, meta)
        own = [(m.name, m.dir) for m in self.mixture] or [(None, self.data_dir)]
        self._val_folders = [
            (name, folder, self.meta if i == 0 else DatasetMeta.load(folder))
            for i, (name, folder) in enumerate(own + self.val_sources)
        ]
        self._train_metas = [f[2] for f in self._val_folders[: len(own)]]
        self._stream: Any = None  # the latest training stream (its epoch lengths feed the mixture ledger)
        self.consumed_micro_batches = 0  # of this rank, in this run's layout
        self.consumed_global_batches = 0  # the data position saved in checkpoints
        self._accumulation = 1
        self.bad_shard_names: set[str] = set()  # unreadable shards skipped (also saved in checkpoints)
        self._resume_from: dict[str, Any] | None = None

    # --- checks ------------------------------------------------------------------------------
    def validate(
        self, seq_len: int | None, vocab_size: int, tokenizer: str = "gpt2", block_size: int | None = None
    ) -> None:
        """Refuse data that cannot feed this run, before training: raise :class:`DataMismatchError`
        saying what to fix (another tokenizer, vocab, sequence length, empty split, missing shards).

        Args:
            seq_len: the sequence length the run asks for (None: accept the data's).
            vocab_size: the model's vocabulary size; every token id of the data must fit.
            tokenizer: the tokenizer the model was built for.
            block_size: the model's context length; the data's sequences must fit in it.
        """
        m, where = self.meta, Path(self.data_dir) / "meta.json"
        if m.tokenizer != tokenizer:
            raise DataMismatchError(
                f"{where}: shards use tokenizer {m.tokenizer!r}, the model expects {tokenizer!r}; "
                "re-run data/prepare.py for this model"
            )
        if m.vocab_size > vocab_size:
            raise DataMismatchError(
                f"{where}: data vocab {m.vocab_size} exceeds the model's vocab_size {vocab_size}; "
                "use a model with a vocabulary that covers the tokenizer"
            )
        if seq_len is not None and m.seq_len != seq_len:
            raise DataMismatchError(
                f"{where}: shards hold sequences of {m.seq_len} tokens but the run asks for {seq_len}; "
                f"re-run data/prepare.py with --seq-len {seq_len} or set data.seq_len={m.seq_len}"
            )
        if block_size is not None and m.seq_len > block_size:
            raise DataMismatchError(
                f"{where}: shards hold sequences of {m.seq_len} tokens, longer than the model's context of "
                f"{block_size}; re-run data/prepare.py with --seq-len {block_size} (or less)"
            )
        for split in ("train", "val"):
            shards = self.meta.shards(split)
            if not shards or not sum(int(s["samples"]) for s in shards):
                raise DataMismatchError(f"{where}: the {split} split is empty; prepare more data")
            if (self.mixture[0].shard_url if self.mixture else self.shard_url) is None:
                missing = [s["name"] for s in shards if not (Path(self.data_dir) / s["name"]).is_file()]
                if len(missing) == len(shards):
                    raise DataMismatchError(
                        f"{where}: none of the {len(shards)} {split} shards is in {self.data_dir} (e.g. "
                        f"{missing[0]}); copy them there or set data.shard_url to where they are"
                    )
                if missing:
                    warnings.warn(
                        f"{len(missing)} of {len(shards)} {split} shards are missing from {self.data_dir} "
                        f"(e.g. {missing[0]}); they will be skipped and counted as bad shards",
                        stacklevel=2,
                    )
        for name, folder, m in self._val_folders[1:]:
            if (m.tokenizer, m.seq_len) != (self.meta.tokenizer, self.meta.seq_len):
                raise DataMismatchError(
                    f"validation source {name!r} ({folder}): tokenizer {m.tokenizer!r} and seq_len {m.seq_len} differ "
                    f"from the training data's ({self.meta.tokenizer!r}, {self.meta.seq_len}); prepare it the same way"
                )
            if not sum(int(s["samples"]) for s in m.shards("val")):
                raise DataMismatchError(f"validation source {name!r} ({folder}): the val split is empty")
        for m, meta in zip(self.mixture[1:], self._train_metas[1:], strict=True):
            if not sum(int(s["samples"]) for s in meta.shards("train")):
                raise DataMismatchError(f"data source {m.name!r} ({m.dir}): the train split is empty")
            names = [s["name"] for s in meta.shards("train")]
            if m.shard_url is None and not any((Path(m.dir) / n).is_file() for n in names):
                raise DataMismatchError(
                    f"data source {m.name!r}: none of its {len(names)} train shards is in {m.dir} (e.g. {names[0]}); "
                    "copy them there or give the source a shard_url saying where they are"
                )

    @property
    def val_names(self) -> list[str | None]:
        """What each validation loader scores: None for ``data_dir`` (``val/loss``), else a name."""
        return [name for name, _, _ in self._val_folders]

    def set_global_batch(self, global_batch_size: int) -> None:
        """The run's samples per optimizer step (the order's row width); the training loader's
        accumulation is derived from it and the world size."""
        self.global_batch_size = global_batch_size

    def shards_fingerprint(self) -> str:
        """A digest of the training shard list (names, sample counts, checksums): the order's input."""
        rows: list[Any] = [(s["name"], int(s["samples"]), s.get("crc32")) for s in self.meta.shards("train")]
        if self.mixture:  # every source's list, and the mixture's names and initial weights
            rows = [
                [m.name, m.weight, [(s["name"], int(s["samples"]), s.get("crc32")) for s in meta.shards("train")]]
                for m, meta in zip(self.mixture, self._train_metas, strict=True)
            ]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def _order_params(self, world: int) -> dict[str, Any]:
        train = [s for meta in self._train_metas for s in meta.shards("train")]
        return {
            "order": ORDER,
            "seed": self.seed,
            "partitions": self.partitions,
            "mix_shards": self.mix_shards,
            "global_batch_size": self.global_batch_size or self.micro_batch_size * world,
            "shards_fingerprint": self.shards_fingerprint(),
            "shards": len(train),
            "samples": sum(int(s["samples"]) for s in train),
            **({"mixture_schedule": self._schedule_rows()} if self.mixture else {}),
        }

    def _schedule_rows(self) -> list[list[Any]]:
        """The mixture's weight changes as ``[step, {name: weight}]`` rows (what a checkpoint keeps)."""
        return [[int(c.step), {n: float(w) for n, w in sorted(c.weights.items())}] for c in self.schedule]

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """A resumed mixture may change its schedule from the resume point on (e.g. to anneal), but
        not before it: the samples already consumed per source follow the weights then in force."""
        if not self.mixture or "mixture_schedule" not in saved:
            return
        passed = int(saved["consumed_global_batches"])
        then = [row for row in saved["mixture_schedule"] if row[0] < passed]
        now = [row for row in self._schedule_rows() if row[0] < passed]
        if then != now:
            raise DataMismatchError(
                f"data.schedule changes the mixture's weights before step {passed}, which the checkpoint has "
                f"already trained: its changes before then were {then or 'none'}, the config's are {now or 'none'}. "
                f"Keep the changes before step {passed} as they were (changes from step {passed} on are fine), or "
                "start a new run (init_from=<checkpoint> keeps the weights)"
            )
        if saved["mixture_schedule"] != self._schedule_rows():
            warnings.warn(
                f"data.schedule differs from the checkpoint's after step {passed}: the mixture follows the new "
                f"changes from there ({self._schedule_rows()}; the checkpoint had {saved['mixture_schedule']})",
                stacklevel=2,
            )

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def bad_shards(self) -> int:
        """Distinct unreadable shards this rank has skipped so far (over all its workers and the
        runs this one resumes)."""
        return len(self.bad_shard_names)

    def bad_shards_all_ranks(self) -> int:
        """Distinct unreadable shards skipped by any rank. A collective under DDP: call it on every
        rank (RunSummary.write does)."""
        import torch.distributed as dist

        names = set(self.bad_shard_names)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(names))
            names = {n for part in gathered for n in part}
        return len(names)

    # --- loaders -----------------------------------------------------------------------------
    def _shards(self, split: str, source: int = 0) -> list[Shard]:
        """The shards of ``split`` of the ``source``-th validation folder (0: ``data_dir``; with a
        mixture, source ``k`` is its ``k``-th source). ``data_dir`` alone reads from ``shard_url``, a
        mixture's source from its own ``shard_url``; the other folders hold their shards."""
        _, folder, meta = self._val_folders[source]
        template = self.shard_url if not (source or self.mixture) else None
        if self.mixture and source < len(self.mixture):
            template = self.mixture[source].shard_url
        return [
            Shard(
                template.format(name=s["name"]) if template else str(Path(folder) / s["name"]),
                int(s["samples"]),
                s.get("crc32"),
            )  # fmt: skip
            for s in meta.shards(split)
        ]

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: PackedStream, split: str, source: int = 0) -> DataLoader:
        loader = PackedLoader(
            dataset,
            batch_size=None,  # the stream yields whole micro-batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=leave_signals_to_main_process,  # SLURM's SIGTERM reaches workers too
        )
        loader.on_skip = lambda batch: self._note_bad_shards(batch.get("bad_shards"), split, source)
        return loader

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        global_batch = self.global_batch_size or self.micro_batch_size * world
        self._accumulation = global_batch // (self.micro_batch_size * world)
        self.consumed_micro_batches = start = self._resume_batch(world, global_batch)
        self.consumed_global_batches = -(-start // self._accumulation)
        if self.mixture:
            stream: Any = MixtureStream(
                [self._shards("train", k) for k in range(len(self.mixture))], self.plan(global_batch),
                self.meta.sample_len, self.micro_batch_size, rank, world, seed=self.seed, start_batch=start,
                mix_shards=self.mix_shards,
            )  # fmt: skip
        else:
            stream = PackedStream(
                self._shards("train"), self.meta.sample_len, self.micro_batch_size, rank, world,
                seed=self.seed, shuffle=True, infinite=True, start_batch=start, mix_shards=self.mix_shards,
                global_batch_size=global_batch, partitions=self.partitions,
            )  # fmt: skip
        self._stream = stream
        return self._loader(stream, "train")

    def plan(self, global_batch: int | None = None) -> MixturePlan:
        """The mixture's slot plan for ``global_batch`` (default: the run's)."""
        G = global_batch or self.global_batch_size or self.micro_batch_size * self._rank_world()[1]
        return MixturePlan.from_sources(self.mixture, G, self.schedule)

    def mixture_ledger(self) -> dict[str, dict[str, float]] | None:
        """Per source after the consumed global batches: samples, finished epochs, position in the
        current epoch and ``epochs`` (fractional). None without a mixture or before training."""
        if not self.mixture or not isinstance(self._stream, MixtureStream):
            return None
        sizes = self._stream.epoch_samples
        ledger = self._stream.plan.ledger(self.consumed_global_batches, sizes).as_dict()
        for row, size in zip(ledger.values(), sizes, strict=True):
            row["epochs_float"] = row["samples"] / size
        return ledger

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader over ``data_dir``'s val split; with a mixture or ``val_sources``, one loader
        per folder (:attr:`val_names`)."""
        rank, world = self._rank_world()
        loaders = []
        for source in range(len(self._val_folders)):
            stream = PackedStream(
                self._shards("val", source), self.meta.sample_len, self.micro_batch_size, rank, world,
                seed=self.seed, shuffle=False, infinite=False, max_batches=self.val_batches,
            )  # fmt: skip
            loaders.append(self._loader(stream, "val", source))
        return loaders if len(loaders) > 1 else loaders[0]

    # --- the data position -------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        trainer = getattr(self, "trainer", None)
        split = "train" if trainer is None or trainer.training else "val"
        self._note_bad_shards(batch.pop("bad_shards", None), split, dataloader_idx if split == "val" else 0)
        index = batch.pop("batch_index", None)
        global_batch = batch.pop("global_batch", None)
        if index is not None and trainer is not None and trainer.training:
            self.consumed_micro_batches = int(index) + 1
            # Rounded up: after a dropped placeholder (unreadable shard) a step can end inside a global
            # batch; a resume at another layout skips the rest of it rather than repeat samples.
            self.consumed_global_batches = -(-self.consumed_micro_batches // self._accumulation)
            if os.environ.get(TRACE_ENV):
                self._trace(int(global_batch), int(index), batch["tokens"], batch.get("sample_keys"))
        return batch

    def _note_bad_shards(self, ids: Any, split: str, source: int = 0) -> None:
        """Record (and report once) the shards of ``split`` (of validation source ``source``) a worker
        found unreadable."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids or ())
        if not ids:
            return
        if split == "train" and self.mixture:  # ids index the concatenation of the sources' lists
            names = [
                f"{m.name}/{s['name']}" for m, meta in zip(self.mixture, self._train_metas) for s in meta.shards(split)
            ]
        else:
            name = self._val_folders[source][0]
            prefix = f"{name}/" if source or self.mixture else ""  # shard names repeat across folders
            names = [prefix + s["name"] for s in self._val_folders[source][2].shards(split)]
        new = {names[int(i)] for i in ids} - self.bad_shard_names
        if new:
            self.bad_shard_names |= new
            rank = self._rank_world()[0]
            print(
                f"data: skipped {len(new)} unreadable shard(s) {sorted(new)}; {self.bad_shards} so far (rank {rank})",
                file=sys.stderr,
                flush=True,
            )

    def _trace(self, global_batch: int, index: int, tokens: torch.Tensor, keys: torch.Tensor | None) -> None:
        """Append ``global_batch batch_index crc32(tokens) key,key,...`` to ``$CGPT_DATA_TRACE.rank<r>``:
        a ledger of the samples each optimizer step consumed (keys: :func:`cgpt.data.stream.sample_key`)."""
        rank = self._rank_world()[0]
        digest = zlib.crc32(tokens.cpu().numpy().tobytes())
        listed = ",".join(map(str, keys.tolist())) if keys is not None else ""
        with open(f"{os.environ[TRACE_ENV]}.rank{rank}", "a") as f:
            f.write(f"{global_batch} {index} {digest} {listed}\n")

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world()
        params = self._order_params(world)
        return {
            **params,
            "consumed_global_batches": self.consumed_global_batches,
            "consumed_samples": self.consumed_global_batches * params["global_batch_size"],
            "consumed_micro_batches": self.consumed_micro_batches,  # per rank, in the layout below
            "micro_batch_size": self.micro_batch_size,
            "world_size": world,
            "bad_shard_names": sorted(self.bad_shard_names),
            **({"mixture_ledger": self.mixture_ledger()} if self.mixture else {}),  # for reading; not used to resume
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a checkpoint's data position; refuse one whose order cannot continue here (another
        shard list, seed, partitions or mix_shards) with :class:`DataMismatchError`, before training."""
        s = dict(state_dict)
        if s.get("order") == ORDER:
            here = self._order_params(s.get("world_size", 1))
            if s["shards_fingerprint"] != here["shards_fingerprint"]:
                raise DataMismatchError(
                    f"the checkpoint was trained on another shard list than {Path(self.data_dir) / 'meta.json'}: "
                    f"{s['shards']} train shards, {s['samples']} samples (fingerprint {s['shards_fingerprint']}) then, "
                    f"{here['shards']} shards, {here['samples']} samples ({here['shards_fingerprint']}) now. "
                    "Point data.dir at the data the run started with, or start a new run (init_from=<checkpoint> "
                    "keeps the weights) to train on the new data"
                )
            self._check_schedule(s)
            changed = [f"{k} {s[k]} -> {here[k]}" for k in ("seed", "partitions", "mix_shards") if s[k] != here[k]]
            if changed:
                raise DataMismatchError(
                    f"resuming with another data order than the checkpoint's ({', '.join(changed)}): set seed, "
                    "data.partitions and data.mix_shards back to the checkpoint's values to continue its order, "
                    "or start a new run (init_from=<checkpoint> keeps the weights)"
                )
        self._resume_from = s
        self.bad_shard_names |= set(s.get("bad_shard_names", ()))

    def _resume_batch(self, world: int, global_batch: int) -> int:
        """This rank's micro-batches already consumed: the checkpoint's own count in the same layout
        (exact even after dropped placeholders), else its global batches in this layout."""
        s = self._resume_from
        if s and s.get("order") == ORDER and s["global_batch_size"] == global_batch:
            if (s["world_size"], s["micro_batch_size"]) == (world, self.micro_batch_size):
                return int(s["consumed_micro_batches"])
        return self._resume_global_batch(global_batch) * (global_batch // (self.micro_batch_size * world))

    def _resume_global_batch(self, global_batch: int) -> int:
        """Global batches already consumed, counted in rows of this run's global batch."""
        s = self._resume_from
        if not s:
            return 0
        if s.get("order") != ORDER:  # a checkpoint of the previous, per-rank order
            samples = int(s["consumed_micro_batches"]) * s["micro_batch_size"] * s["world_size"]
            warnings.warn(
                f"the checkpoint counts its data position in an older order: continuing after its {samples} "
                "samples in the global order (the samples from here are another draw)",
                stacklevel=2,
            )
            return samples // global_batch
        if s["global_batch_size"] == global_batch:
            return int(s["consumed_global_batches"])
        samples = int(s["consumed_samples"])
        warnings.warn(
            f"data.global_batch_size {s['global_batch_size']} -> {global_batch} since the checkpoint: continuing "
            f"after the same {samples} samples (global batch {samples // global_batch}); the order is laid out "
            "in rows of the new global batch from there, so the samples that follow are another draw",
            stacklevel=2,
        )
        return samples // global_batch
