"""Start training from published or earlier weights: ``init_from=<HF directory | cgpt checkpoint>``.

A *source* is one of:

- a Hugging Face GPT-2 checkpoint directory (``config.json`` + ``model.safetensors`` /
  ``pytorch_model.bin``), e.g. a downloaded ``cerebras/Cerebras-GPT-111M`` (read by :mod:`cgpt.hf`);
- a cgpt Lightning checkpoint (``.../checkpoints/last.ckpt``, ``best-*.ckpt``): a file, or the
  sharded folder an FSDP or DeepSpeed run saves (consolidated in memory on load);
- a cgpt run folder (``outputs/<run>``), meaning its ``checkpoints/last.ckpt``.

Only weights come from the source: the optimizer and lr schedule start fresh. Loading is strict:
every tensor of the model must be in the source with the same shape and nothing may be left over,
otherwise :class:`WeightMismatchError` lists every missing, unexpected and mis-shaped tensor.
A cgpt checkpoint trained with LoRA is merged on load (the adapters are folded into the weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cgpt.checkpoint import LAST, model_state_dict
from cgpt.config import GPT2_EOS_ID, ModelConfig
from cgpt.model import GPT


class WeightMismatchError(ValueError):
    """The source's tensors do not match the model being trained; the message lists each difference."""


class TokenizerMismatchError(ValueError):
    """The source was trained with another tokenizer or vocabulary than the data uses."""


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """``("hf" | "cgpt", path)`` for an init_from value; raises FileNotFoundError saying what was expected."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        if _is_sharded_checkpoint(path):
            return "cgpt", path
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file() or _is_sharded_checkpoint(candidate):
                return "cgpt", candidate
        raise FileNotFoundError(
            f"init_from={source}: the folder has neither config.json (a Hugging Face checkpoint) nor "
            f"checkpoints/{LAST} (a cgpt run folder), nor is it an FSDP or DeepSpeed checkpoint folder"
        )
    if path.is_file():
        return "cgpt", path
    raise FileNotFoundError(
        f"init_from={source} does not exist: give a Hugging Face checkpoint folder, a cgpt .ckpt file or a run folder"
    )


def _is_sharded_checkpoint(path: Path) -> bool:
    """An FSDP (torch.distributed.checkpoint) or DeepSpeed checkpoint folder."""
    return path.is_dir() and ((path / ".metadata").is_file() or (path / "latest").is_file())


def _load_ckpt(path: Path) -> dict[str, Any]:
    if path.is_dir():  # sharded: gathered into one state dict (weights in memory: there is no mmap)
        from cgpt.strategies import consolidate_checkpoint

        return consolidate_checkpoint(path)
    # mmap: reading the hyperparameters of a 13B checkpoint must not load its weights into memory.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def source_model_config(source: str | os.PathLike) -> ModelConfig:
    """The architecture of ``source`` without loading its weights."""
    kind, path = resolve_source(source)
    if kind == "hf":
        from cgpt.hf import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()), path / "config.json")
    hp = _load_ckpt(path).get("hyper_parameters", {})
    if "model" not in hp:
        raise ValueError(f"init_from={path}: not a cgpt checkpoint (no hyper_parameters.model)")
    return ModelConfig.from_dict(dict(hp["model"]))


def source_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The GPT state dict of ``source`` (cgpt names, ``nn.Linear`` layout, LoRA merged)."""
    kind, path = resolve_source(source)
    if kind == "hf":
        from cgpt.hf import from_hf

        return from_hf(path).state_dict()
    ckpt = _load_ckpt(path)
    state = model_state_dict(ckpt)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    lora = ckpt.get("hyper_parameters", {}).get("lora")
    if lora and any(".lora_" in k for k in state):
        from cgpt.lora import LoRAConfig, apply_lora, merge_lora

        model = GPT(ModelConfig.from_dict(dict(ckpt["hyper_parameters"]["model"])))
        apply_lora(model, LoRAConfig.from_dict(lora))
        load_strict(model, state, path)
        state = merge_lora(model).state_dict()
    return state


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike, skip_adapters: bool = False
) -> None:
    """Copy ``state`` into ``model``; every tensor accounted for and shaped alike, or a full error.

    ``skip_adapters``: the LoRA adapters of ``model`` are not expected in ``state`` (they start
    fresh) and are left as they are."""
    own = {k: v for k, v in model.state_dict().items() if not (skip_adapters and ".lora_" in k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: source {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"init_from={source}: the weights do not match the model"]
        for title, items in (("missing from the source", missing), ("not in the model", unexpected),
                             ("shape mismatches", shapes)):  # fmt: skip
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        lines.append("  the architecture comes from the source; check that it is a cgpt/GPT-2 checkpoint of this model")
        raise WeightMismatchError("\n".join(lines))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k].to(dtype=t.dtype))


def load_weights(model: GPT, source: str | os.PathLike) -> None:
    """Load the weights of ``source`` into ``model`` strictly (see :func:`load_strict`); LoRA
    adapters already on ``model`` are kept (a source trained with LoRA arrives merged)."""
    load_strict(model, source_state_dict(source), source, skip_adapters=True)


def check_tokenizer(
    source: str | os.PathLike, tokenizer_name: str, vocab_size: int, eos_id: int = GPT2_EOS_ID
) -> list[str]:
    """Refuse data tokenized for another vocabulary than the source's; return notes on what was checked.

    ``tokenizer_name``/``vocab_size``/``eos_id`` describe the training data (``meta.json`` for
    packed shards, the GPT-2 tokenizer for SFT). A Hugging Face source's own tokenizer files, when
    present, must equal cgpt's GPT-2 BPE token for token; its ``eos_token_id`` must be the data's.
    """
    config = source_model_config(source)
    kind, path = resolve_source(source)
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
