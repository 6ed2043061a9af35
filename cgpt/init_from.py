"""Start training from published or earlier weights: ``init_from=<any weights source>``.

The source is anything :func:`cgpt.weights.load_source` reads (Hugging Face folder, cgpt ``.ckpt``,
FSDP or DeepSpeed folder, run folder, LoRA-trained checkpoint). Only weights come from it: the
optimizer and lr schedule start fresh. Loading is strict (:class:`cgpt.weights.WeightMismatchError`
lists every missing, unexpected and mis-shaped tensor). This module adds what is particular to
starting a run from a source: refusing training data tokenized for another vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from cgpt.config import GPT2_EOS_ID
from cgpt.weights import load_into, resolve_checkpoint, source_model_config


class TokenizerMismatchError(ValueError):
    """The source was trained with another tokenizer or vocabulary than the data uses."""


def load_weights(model: nn.Module, source: str | os.PathLike) -> None:
    """Load the weights of ``source`` into ``model`` strictly; LoRA adapters on ``model`` are kept."""
    load_into(model, source, label=f"init_from={source}")


def check_tokenizer(
    source: str | os.PathLike, tokenizer_name: str, vocab_size: int, eos_id: int = GPT2_EOS_ID
) -> list[str]:
    """Refuse data tokenized for another vocabulary than the source's; return notes on what was checked.

    ``tokenizer_name``/``vocab_size``/``eos_id`` describe the training data (``meta.json`` for
    packed shards, the GPT-2 tokenizer for SFT). A Hugging Face source's own tokenizer files, when
    present, must equal cgpt's GPT-2 BPE token for token; its ``eos_token_id`` must be the data's.
    """
    config = source_model_config(source)
    kind, path = resolve_checkpoint(source)
    notes = []
    if tokenizer_name != "gpt2":
        raise TokenizerMismatchError(
            f"the data was tokenized with {tokenizer_name!r}, but init_from={source} is a GPT-2 BPE model"
        )
    if vocab_size > config.vocab_size:
        raise TokenizerMismatchError(
            f"the data's vocabulary ({vocab_size} ids) exceeds the vocab_size of init_from={source} "
            f"({config.vocab_size}): the data was made with another tokenizer"
        )
    if kind != "hf":
        return [f"{path}: cgpt checkpoint, vocab_size {config.vocab_size} covers the data's {vocab_size}"]
    hf_config = json.loads((path / "config.json").read_text())
    src_eos = hf_config.get("eos_token_id", GPT2_EOS_ID)
    if src_eos is not None and src_eos != eos_id:
        raise TokenizerMismatchError(
            f"{path}/config.json: eos_token_id={src_eos} but the data uses EOS {eos_id}; "
            "this checkpoint was trained with another tokenizer"
        )
    from cgpt.data.tokenizer import get_tokenizer

    ours = get_tokenizer()
    theirs_vocab, theirs_merges = _hf_tokenizer_files(path)
    if theirs_vocab is None:
        notes.append(f"{path}: no tokenizer files; assuming the GPT-2 BPE (eos {eos_id} matches)")
        return notes
    our_vocab = json.loads(Path(ours.vocab_path).read_text(encoding="utf-8"))
    our_merges = _merge_lines(Path(ours.merges_path).read_text(encoding="utf-8"))
    if theirs_vocab != our_vocab:
        differ = sorted(set(theirs_vocab.items()) ^ set(our_vocab.items()))[:5]
        raise TokenizerMismatchError(
            f"{path}: its tokenizer vocabulary differs from cgpt's GPT-2 BPE ({len(theirs_vocab)} vs "
            f"{len(our_vocab)} entries; e.g. {differ}); re-tokenize the data with that tokenizer or pick a GPT-2 model"
        )
    if theirs_merges is not None and theirs_merges != our_merges:
        raise TokenizerMismatchError(f"{path}: its BPE merges differ from cgpt's GPT-2 BPE")
    notes.append(f"{path}: tokenizer files match the GPT-2 BPE ({len(our_vocab)} tokens, eos {eos_id})")
    return notes


def _merge_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#version")]


def _hf_tokenizer_files(path: Path) -> tuple[dict[str, int] | None, list[str] | None]:
    """(vocab, merges) of a HF folder from vocab.json/merges.txt or tokenizer.json; (None, None) if absent."""
    if (path / "vocab.json").is_file():
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        merges_file = path / "merges.txt"
        merges = _merge_lines(merges_file.read_text(encoding="utf-8")) if merges_file.is_file() else None
        return vocab, merges
    if (path / "tokenizer.json").is_file():
        model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return model.get("vocab"), merges or None
    return None, None
