"""SFT data: JSONL records -> token examples -> packed or padded batches (the loss is in :mod:`cgpt.sft`).

Records (one JSON object per line):

- ``{"prompt": "...", "response": "..."}``: one user turn and one assistant turn;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: a chat.

Both are rendered through a :class:`ChatTemplate` (defaults below) and tokenized piece by piece
with the GPT-2 BPE; every assistant turn ends with EOS. Only assistant contents and their EOS are
*targets* (counted in the loss); system/user text and the role headers get label ``-100``.

Batches come in two layouts (``pack``):

- padded (``pack=False``): one example per row, right-padded; padding targets are ``-100`` and
  causal attention already keeps real tokens from seeing the padding that follows them;
- packed (``pack=True``): several examples per row, each with its own positions (restarting at 0)
  and a segment id; the model gets a block-diagonal causal mask, so no example attends to another.

Records that cannot be used (invalid JSON, missing or empty fields, unknown roles, no assistant
turn, longer than the context) are reported with their line numbers and skipped, or refused all
together with ``on_bad_record="error"``. Nothing is ever truncated.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from cgpt.config import ConfigError
from cgpt.lm_head import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


class BadRecordsError(ValueError):
    """The SFT data holds records that cannot be used (and ``on_bad_record="error"``)."""


# --- the template --------------------------------------------------------------------------------
@dataclass
class ChatTemplate:
    """How a conversation becomes text. ``{content}`` marks where each message's text goes.

    Fields:
        system: a system message (no loss).
        user: a user message (no loss).
        assistant: an assistant message; it must end with ``{content}``. The part before it (the
            header) gets no loss; the content and the EOS appended after it are the targets.

    With the defaults, ``{"prompt": "2+2?", "response": "4"}`` becomes
    ``"### User:\\n2+2?\\n\\n### Assistant:\\n4<|endoftext|>"`` with the loss on ``4<|endoftext|>``.
    """

    system: str = "### System:\n{content}\n\n"
    user: str = "### User:\n{content}\n\n"
    assistant: str = "### Assistant:\n{content}"

    def __post_init__(self) -> None:
        for role in ROLES:
            text = getattr(self, role)
            if text.count("{content}") != 1:
                raise ConfigError(f"ChatTemplate.{role}={text!r} must contain {{content}} exactly once")
        if not self.assistant.endswith("{content}"):
            raise ConfigError(
                f"ChatTemplate.assistant={self.assistant!r} must end with {{content}} (EOS follows the content)"
            )

    def split(self, role: str) -> tuple[str, str]:
        """(text before, text after) the content of a ``role`` message."""
        before, after = getattr(self, role).split("{content}")
        return before, after


@dataclass
class Example:
    """One tokenized record. ``ids`` is the whole text; ``loss_mask[i]`` says token i is a target.

    ``prompt_ids`` (everything before the last assistant content) and ``reference`` (that content)
    serve the generated samples at validation.
    """

    ids: list[int]
    loss_mask: list[bool]
    line: int
    prompt_ids: list[int] = field(default_factory=list)
    reference: str = ""

    @property
    def length(self) -> int:
        """Positions the model sees: every token but the last is an input."""
        return len(self.ids) - 1


# --- records -> examples ---------------------------------------------------------------------------
def record_messages(record: Any) -> list[dict[str, str]]:
    """The messages of a record, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (use {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise ValueError(f"messages[{i}].content must be a string")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ValueError(f"messages[{i}] is an empty assistant response")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}: expected 'prompt' and 'response', or 'messages'")
    if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
        raise ValueError("'prompt' and 'response' must be strings")
    if not record["response"].strip():
        raise ValueError("empty response")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def tokenize_messages(messages: list[dict[str, str]], tokenizer: Any, template: ChatTemplate) -> Example:
    """Render ``messages`` through ``template`` and tokenize; targets are assistant contents + EOS."""
    ids: list[int] = []
    mask: list[bool] = []
    prompt_ids: list[int] = []
    reference = ""

    def add(text: str, target: bool) -> None:
        if text:
            t = tokenizer.encode(text)
            ids.extend(t)
            mask.extend([target] * len(t))

    for m in messages:
        before, after = template.split(m["role"])
        add(before, False)
        if m["role"] == "assistant":
            prompt_ids, reference = list(ids), m["content"]
            add(m["content"], True)
            ids.append(tokenizer.eos_id)
            mask.append(True)
        else:
            add(m["content"], False)
            add(after, False)
    return Example(ids=ids, loss_mask=mask, line=0, prompt_ids=prompt_ids, reference=reference)


def load_examples(
    path: str | os.PathLike,
    tokenizer: Any,
    template: ChatTemplate,
    max_seq_len: int,
    on_bad_record: Literal["skip", "error"] = "skip",
) -> tuple[list[Example], list[str]]:
    """Read a JSONL file into examples; return ``(examples, problems)`` with one problem per bad line.

    An example longer than ``max_seq_len`` positions is a problem (never truncated). With
    ``on_bad_record="error"`` any problem raises :class:`BadRecordsError` listing them all.
    """
    if on_bad_record not in ("skip", "error"):
        raise ConfigError(f"on_bad_record={on_bad_record!r}: use 'skip' or 'error'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist (JSONL of prompt/response or messages records)")
    examples, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = record_messages(json.loads(line))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{line_no}: invalid JSON ({e.msg})")
                continue
            except ValueError as e:
                problems.append(f"{path}:{line_no}: {e}")
                continue
            ex = tokenize_messages(messages, tokenizer, template)
            if ex.length > max_seq_len:
                problems.append(
                    f"{path}:{line_no}: {len(ex.ids)} tokens ({ex.length} positions) exceed max_seq_len "
                    f"{max_seq_len}; shorten the record or raise max_seq_len (up to the model's block_size)"
                )
                continue
            ex.line = line_no
            examples.append(ex)
    if problems and on_bad_record == "error":
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise BadRecordsError(
            f"{len(problems)} bad record(s) in {path} (set on_bad_record=skip to skip them):\n  {shown}"
        )
    return examples, problems


# --- examples -> batches ---------------------------------------------------------------------------
def pack_rows(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Greedily fill rows of ``seq_len`` positions with examples taken in ``order``."""
    rows: list[list[int]] = []
    used = seq_len + 1  # forces a new row first
    for i in order:
        if used + lengths[i] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def collate(examples: list[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Rows of examples -> ``input_ids``, ``targets`` (``-100`` off the responses and on padding),
    ``position_ids`` and, for packed rows, ``segment_ids`` (0 on padding, 1.. per example)."""
    T = max(sum(e.length for e in row) for row in examples)
    B = len(examples)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(examples):
        t = 0
        for s, ex in enumerate(row, start=1):
            n = ex.length
            ids = torch.tensor(ex.ids, dtype=torch.long)
            keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            inputs[b, t : t + n] = ids[:-1]
            targets[b, t : t + n] = torch.where(keep, ids[1:], IGNORE_INDEX)
            positions[b, t : t + n] = torch.arange(n)
            segments[b, t : t + n] = s
            t += n
        positions[b, t:] = torch.arange(T - t)  # padding: any valid position, never a target
    batch = {"input_ids": inputs, "targets": targets, "position_ids": positions}
    if packed:
        batch["segment_ids"] = segments
    return batch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: query i sees key j <= i of the same segment (padding sees padding)."""
    T = segment_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class _Batches(IterableDataset):
    """Micro-batches of one rank in a deterministic order; training repeats forever from ``start``.

    Training micro-batches also carry ``step_targets``: the target tokens of the whole optimizer step
    they belong to (``accumulate`` micro-batches on each of the ``world`` ranks), which
    :class:`cgpt.sft.SFTModule` divides by so that a step's loss is the per-token mean over its global
    batch, whatever the split into ranks and micro-batches.
    """

    def __init__(
        self,
        examples: list[Example],
        micro_batch_size: int,
        seq_len: int,
        pack: bool,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        infinite: bool = True,
        start: int = 0,
        accumulate: int = 1,
    ) -> None:
        self.examples, self.mbs, self.seq_len, self.pack, self.pad_id = (
            examples,
            micro_batch_size,
            seq_len,
            pack,
            pad_id,
        )
        self.seed, self.rank, self.world, self.shuffle, self.infinite, self.start = (
            seed,
            rank,
            world,
            shuffle,
            infinite,
            start,
        )
        self.accumulate = accumulate
        self.targets = [sum(e.loss_mask[1:]) for e in examples]
        if self.batches_per_epoch() == 0:
            raise ConfigError(
                f"{len(examples)} examples make fewer micro-batches of {micro_batch_size} than the {world} "
                "rank(s): use more data or a smaller micro_batch_size"
            )

    def _layout(self, epoch: int) -> tuple[list[list[list[int]]], int]:
        """Epoch ``epoch`` on every rank: its micro-batches (rows of example indices; rank r takes
        r, r + world, ...) and how many micro-batches each rank takes."""
        n = len(self.examples)
        order = list(np.random.default_rng([self.seed, epoch]).permutation(n)) if self.shuffle else list(range(n))
        if self.pack:
            rows = pack_rows([e.length for e in self.examples], order, self.seq_len)
        else:
            rows = [[i] for i in order]
        batches = [rows[i : i + self.mbs] for i in range(0, len(rows), self.mbs)]
        per_rank = len(batches) // self.world if self.infinite else -(-len(batches) // self.world)
        return batches, per_rank

    def _epoch(self, epoch: int) -> list[list[list[Example]]]:
        batches, per_rank = self._layout(epoch)
        mine = batches[self.rank :: self.world][:per_rank]
        return [[[self.examples[i] for i in row] for row in b] for b in mine]

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0))

    def _step_targets(self) -> Iterator[int]:
        """Target tokens of each optimizer step over all ranks, step after step from step 0.

        Every rank takes the same number of micro-batches per epoch, so the i-th micro-batch of each
        rank sits at the same position of the same epoch: position p of rank r is batch p * world + r.
        """
        epoch, pending, total = 0, 0, 0
        while True:
            batches, per_rank = self._layout(epoch)
            for p in range(per_rank):
                for b in batches[p * self.world : (p + 1) * self.world]:
                    total += sum(self.targets[i] for row in b for i in row)
                pending += 1
                if pending == self.accumulate:
                    yield total
                    pending, total = 0, 0
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, epoch = 0, 0
        step_targets = self._step_targets() if self.infinite else None
        targets = 0
        while True:
            batches = self._epoch(epoch)
            for b in batches:
                if step_targets is not None and index % self.accumulate == 0:
                    targets = next(step_targets)
                if index >= self.start:
                    batch = collate(b, self.pad_id, self.pack)
                    if step_targets is not None:
                        batch["step_targets"] = torch.tensor(targets)
                    yield {**batch, "batch_index": index}
                index += 1
            if not self.infinite:
                return
            epoch += 1


class _Listed(IterableDataset):
    """Batches already dealt to this rank, yielded as they are."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


class SFTDataModule(L.LightningDataModule):
    """Train/val loaders over JSONL SFT records, tokenized in memory; the data position is checkpointed.

    Args:
        train_file: JSONL records (see the module docstring).
        val_file: JSONL validation records; ``None`` holds out ``val_fraction`` of ``train_file``.
        val_fraction: share of the training records held out when there is no ``val_file``.
        max_seq_len: positions per example / packed row (at most the model's block_size).
        micro_batch_size: rows per device per forward pass.
        pack: pack several examples per row (block-diagonal attention) instead of padding.
        on_bad_record: ``skip`` (report and drop) or ``error`` (refuse the data).
        template: :class:`ChatTemplate` fields.
        seed: seed of the train/val split and the per-epoch shuffle.
        val_batches: cap on validation micro-batches per rank (``None``: all).
    """

    def __init__(
        self,
        train_file: str,
        max_seq_len: int,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        micro_batch_size: int = 8,
        pack: bool = True,
        on_bad_record: Literal["skip", "error"] = "skip",
        template: dict[str, str] | None = None,
        seed: int = 0,
        val_batches: int | None = None,
        log: Any = None,
    ) -> None:
        super().__init__()
        from cgpt.data.tokenizer import get_tokenizer

        self.tokenizer = get_tokenizer()
        self.template = ChatTemplate(**(template or {}))
        self.max_seq_len, self.micro_batch_size, self.pack, self.seed = max_seq_len, micro_batch_size, pack, seed
        self.val_batches = val_batches
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        train, problems = load_examples(train_file, self.tokenizer, self.template, max_seq_len, on_bad_record)
        if val_file:
            val, val_problems = load_examples(val_file, self.tokenizer, self.template, max_seq_len, on_bad_record)
            problems += val_problems
        else:
            if not 0 < val_fraction < 1:
                raise ConfigError(f"val_fraction={val_fraction} must be in (0, 1) when no val_file is given")
            order = np.random.default_rng(seed).permutation(len(train))
            n_val = max(1, round(len(train) * val_fraction)) if len(train) > 1 else 0
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        for p in problems[:20]:
            log(f"skipped {p}")
        if len(problems) > 20:
            log(f"... {len(problems) - 20} more skipped records")
        if not train or not val:
            raise ConfigError(
                f"SFT data: {len(train)} training and {len(val)} validation examples after skipping "
                f"{len(problems)} bad record(s); both must be non-empty"
            )
        self.train_examples, self.val_examples, self.problems = train, val, problems
        targets = sum(sum(e.loss_mask) for e in train)
        log(
            f"SFT data: {len(train)} train / {len(val)} val examples, {len(problems)} skipped; "
            f"{sum(e.length for e in train)} train positions, {targets} target tokens; "
            f"{'packed' if pack else 'padded'} rows of <= {max_seq_len}"
        )
        self.consumed_micro_batches = 0
        self._resume_from: dict[str, Any] | None = None

    @property
    def seq_len(self) -> int:
        """Positions per row (an upper bound for packed and padded rows alike)."""
        return self.max_seq_len

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _batches(self, examples: list[Example], train: bool, start: int = 0) -> _Batches:
        rank, world = self._rank_world()
        trainer = getattr(self, "trainer", None)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        return _Batches(
            examples, self.micro_batch_size, self.max_seq_len, self.pack, self.tokenizer.eos_id, self.seed,
            rank, world, shuffle=train, infinite=train, start=start, accumulate=accumulate,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        start = self._resume_batch()
        self.consumed_micro_batches = start
        return DataLoader(self._batches(self.train_examples, True, start), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        batches = list(self._batches(self.val_examples, False))
        # An iterable dataset: Lightning would deal a list (map-style) to the ranks once more with a
        # DistributedSampler, and each rank would validate on part of its own share only.
        return DataLoader(_Listed(batches[: self.val_batches] if self.val_batches else batches), batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if isinstance(batch, dict) and "batch_index" in batch:
            index = int(batch.pop("batch_index"))
            if trainer is not None and trainer.training:
                self.consumed_micro_batches = index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world()
        return {"consumed_micro_batches": self.consumed_micro_batches, "world_size": world,
                "micro_batch_size": self.micro_batch_size, "seed": self.seed}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = dict(state_dict)

    def _resume_batch(self) -> int:
        s = self._resume_from
        if not s:
            return 0
        _, world = self._rank_world()
        if (s["world_size"], s["micro_batch_size"], s["seed"]) != (world, self.micro_batch_size, self.seed):
            print("SFT resume: another batch layout; the data order restarts from the beginning", file=sys.stderr)
            return 0
        return int(s["consumed_micro_batches"])

    def positions_per_row(self) -> float:
        """Mean positions computed per row (padding to the batch's longest row included) in epoch 0:
        what a training step really processes, for tokens/s and MFU."""
        batches = _Batches(self.train_examples, self.micro_batch_size, self.max_seq_len, self.pack, 0, self.seed)
        rows = positions = 0
        for b in batches._epoch(0):
            rows += len(b)
            positions += len(b) * max(sum(e.length for e in row) for row in b)
        return positions / max(rows, 1)

    def sample_prompts(self, n: int) -> list[Example]:
        """The first ``n`` validation examples (their prompts are completed at each validation)."""
        return self.val_examples[:n]
