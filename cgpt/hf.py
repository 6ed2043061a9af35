"""Hugging Face interop: load ``GPT2LMHeadModel`` checkpoints into cgpt and export cgpt models back.

Cerebras publishes Cerebras-GPT as plain GPT-2 checkpoints, so conversion is a renaming plus
GPT-2's ``Conv1D`` transpose (HF stores ``(in, out)``; ``nn.Linear`` stores ``(out, in)``).

muP models export to an *equivalent standard* GPT-2: the multipliers are folded into the weights
(embedding multiplier into ``wte`` and ``wpe``, the 1/m_w logits multiplier into an untied
``lm_head``, the extra 1/sqrt(d_head) of muP's 1/d_head attention scale into the query part of
``c_attn``), so any GPT-2 runtime gives the same logits. The original cgpt config rides along in
``config.json`` under ``cgpt_model_config`` so :func:`from_hf` can unfold it exactly.

Loading never unpickles arbitrary objects: safetensors first, ``.bin`` only through
``torch.load(weights_only=True)``. Nothing here imports ``transformers``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from cgpt.config import GPT2_EOS_ID, GPT2_VOCAB_SIZE, ModelConfig
from cgpt.model import GPT
from cgpt.presets import PRESETS

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CGPT_CONFIG_KEY = "cgpt_model_config"  # extra config.json key: the cgpt ModelConfig of an export

# GPT-2 Conv1D weights, stored (in, out) by HF; transposed to nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some GPT-2 checkpoints carry (causal-mask constants); not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Tolerance for recognising a tied (or muP-folded) lm_head in a checkpoint.
_TIE_RTOL = 1e-5


class HFConversionError(ValueError):
    """A Hugging Face checkpoint cannot be converted; the message names the file and the problem."""


# --- import -------------------------------------------------------------------------------------
def config_from_hf(hf_config: dict[str, Any], source: str | os.PathLike = CONFIG_FILE) -> ModelConfig:
    """The cgpt :class:`ModelConfig` of a GPT-2 ``config.json`` dict; refuses what cgpt cannot represent."""
    where = str(source)
    if CGPT_CONFIG_KEY in hf_config:
        return ModelConfig.from_dict(dict(hf_config[CGPT_CONFIG_KEY]))
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if model_type != "gpt2" or (archs and not any(a in ("GPT2LMHeadModel", "GPT2Model") for a in archs)):
        raise HFConversionError(
            f"{where}: model_type={model_type!r}, architectures={archs}; cgpt loads only GPT-2 "
            "checkpoints (model_type 'gpt2', GPT2LMHeadModel) such as cerebras/Cerebras-GPT-*"
        )
    act = hf_config.get("activation_function", "gelu_new")
    if act != "gelu":
        raise HFConversionError(
            f"{where}: activation_function={act!r}; cgpt implements Cerebras-GPT's exact-erf 'gelu' only "
            "(OpenAI GPT-2 checkpoints use 'gelu_new', a different network)"
        )
    if not hf_config.get("scale_attn_weights", True):
        raise HFConversionError(f"{where}: scale_attn_weights=false is not supported (cgpt scales by 1/sqrt(d_head))")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf_config.get(flag, False):
            raise HFConversionError(f"{where}: {flag}=true is not supported by cgpt")
    d_model = hf_config["n_embd"]
    config = ModelConfig(
        n_layer=hf_config["n_layer"],
        d_model=d_model,
        n_head=hf_config["n_head"],
        d_ffn=hf_config.get("n_inner") or 4 * d_model,
        vocab_size=hf_config["vocab_size"],
        block_size=hf_config["n_positions"],
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        init_std=hf_config.get("initializer_range", 0.02),
    )
    preset = _matching_preset(config)
    return ModelConfig.from_name(preset) if preset else config


def _matching_preset(config: ModelConfig) -> str | None:
    """The SP preset with exactly this architecture (a published Cerebras-GPT), so training recipes apply."""
    for name in PRESETS:
        if name.endswith("-mup"):
            continue
        candidate = ModelConfig.from_name(name)
        keys = ("n_layer", "d_model", "n_head", "d_ffn", "vocab_size", "block_size", "layer_norm_eps")
        if all(getattr(candidate, k) == getattr(config, k) for k in keys):
            return name
    return None


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (single file or sharded; safetensors preferred)."""
    path = Path(path)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        if (path / single).is_file():
            return _read_weight_file(path / single)
        if (path / index_name).is_file():
            index_file = path / index_name
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFConversionError(f"{index_file}: not a valid shard index ({e})") from e
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_file = path / shard
                if not shard_file.is_file():
                    raise HFConversionError(f"{index_file} lists shard {shard}, which is missing from {path}")
                state.update(_read_weight_file(shard_file))
            return state
    raise HFConversionError(
        f"{path}: no weights found; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}"
    )


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise HFConversionError(f"{file}: cannot be read safely with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise HFConversionError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> GPT:
    """Load a local Hugging Face GPT-2 checkpoint directory (as published for cerebras/Cerebras-GPT-*).

    Reads ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (or their sharded index
    files). A muP model exported by :func:`to_hf` is unfolded back into a muP cgpt model. Any other
    checkpoint whose ``lm_head`` differs from ``wte`` is refused: cgpt ties the two.
    ``dtype`` casts the parameters (default: float32).
    """
    path = Path(path)
    if not path.is_dir():
        raise HFConversionError(f"{path}: not a directory; pass a Hugging Face checkpoint folder")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise HFConversionError(f"{config_file} is missing; a Hugging Face checkpoint folder needs its config.json")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{config_file}: invalid JSON ({e})") from e
    try:
        config = config_from_hf(hf_config, config_file)
    except KeyError as e:
        raise HFConversionError(f"{config_file}: missing key {e}") from e
    state = read_hf_state_dict(path)
    weights = _hf_to_cgpt_state(state, config, path, hf_config)
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    with torch.device("meta"):
        model = GPT(config)  # no init work: every tensor is replaced below
    model.load_state_dict(weights, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: tie again
    return model.to(dtype or torch.float32)


def _hf_to_cgpt_state(
    state: dict[str, torch.Tensor], config: ModelConfig, path: Path, hf_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename, transpose, check shapes and (for a cgpt muP export) unfold the multipliers."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key  # GPT2Model files
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[name] = tensor.float().contiguous()
    head = out.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(out) - {"lm_head.weight"})
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise HFConversionError(
            f"{path}: weights do not match config.json (missing {missing[:8]}, unexpected {unexpected[:8]})"
        )
    wte = out["transformer.wte.weight"]
    if wte.shape[0] != config.vocab_size:
        raise HFConversionError(
            f"{path}: vocab mismatch: transformer.wte.weight has {wte.shape[0]} rows but config.json says "
            f"vocab_size={config.vocab_size}"
        )
    for name, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise HFConversionError(
                f"{path}: shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name])}"
            )
    if config.mup:
        head_expected = _unfold_mup(out, config)
    else:
        head_expected = out["transformer.wte.weight"]
    # Saved in bf16/fp16, the folded head and wte were rounded separately: compare at that precision.
    saved_dtype = state.get("lm_head.weight", torch.empty(0)).dtype
    rtol = max(_TIE_RTOL, 4 * torch.finfo(saved_dtype).eps)
    if head is not None and not torch.allclose(head.float(), head_expected, rtol=rtol, atol=1e-7):
        what = "the muP-folded wte" if config.mup else "transformer.wte.weight"
        raise HFConversionError(
            f"{path}: lm_head.weight differs from {what} (untied embeddings, "
            f"tie_word_embeddings={hf_config.get('tie_word_embeddings', True)}); cgpt's GPT ties the LM head "
            "to the token embedding, so this checkpoint cannot be loaded without changing the network"
        )
    return out


def _unfold_mup(out: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Undo :func:`_fold_mup` in place; return the lm_head weight the export must have had."""
    m_emb = config.embedding_multiplier
    out["transformer.wte.weight"] = out["transformer.wte.weight"] / m_emb
    out["transformer.wpe.weight"] = out["transformer.wpe.weight"] / m_emb
    q_fold = config.attn_scale * math.sqrt(config.d_head)
    d = config.d_model
    for i in range(config.n_layer):
        for suffix in ("weight", "bias"):
            t = out[f"transformer.h.{i}.attn.c_attn.{suffix}"].clone()
            t[:d] /= q_fold
            out[f"transformer.h.{i}.attn.c_attn.{suffix}"] = t
    return out["transformer.wte.weight"] * config.logits_multiplier


# --- export -------------------------------------------------------------------------------------
def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The GPT-2 ``config.json`` of a cgpt model (Cerebras-GPT's published keys)."""
    eos = GPT2_EOS_ID if config.vocab_size > GPT2_EOS_ID else None  # tiny test vocabularies have no EOS
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.d_ffn,
        "activation_function": "gelu",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": not config.mup,
        "torch_dtype": "float32",
        CGPT_CONFIG_KEY: config.to_dict(),
    }


def _fold_mup(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Fold muP's multipliers into the weights (in place) so a standard GPT-2 computes the same logits.

    - embedding output x m_emb: (wte + wpe) * m_emb == wte * m_emb + wpe * m_emb;
    - logits x 1/m_w: an untied head ``wte_orig / m_w`` (computed before wte is scaled);
    - scores x 1/d_head where GPT-2 applies 1/sqrt(d_head): queries (weight and bias) x 1/sqrt(d_head).
    """
    wte = state["transformer.wte.weight"]
    state["lm_head.weight"] = wte * config.logits_multiplier
    state["transformer.wte.weight"] = wte * config.embedding_multiplier
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"] * config.embedding_multiplier
    q_fold = config.attn_scale * math.sqrt(config.d_head)
    d = config.d_model
    for i in range(config.n_layer):
        for suffix in ("weight", "bias"):
            t = state[f"transformer.h.{i}.attn.c_attn.{suffix}"].clone()
            t[:d] *= q_fold
            state[f"transformer.h.{i}.attn.c_attn.{suffix}"] = t


def to_hf(
    model: GPT, out_dir: str | os.PathLike, save_tokenizer: bool | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` as a Hugging Face ``GPT2LMHeadModel`` directory and return its path.

    Writes ``config.json``, ``model.safetensors`` and (``save_tokenizer``, default: when the vocab
    is GPT-2's 50257) the GPT-2 tokenizer files, so ``GPT2LMHeadModel.from_pretrained(out_dir)``
    and ``AutoTokenizer.from_pretrained(out_dir)`` work offline. A muP model is written as the
    equivalent standard GPT-2 with untied embeddings (see :func:`_fold_mup`). ``dtype`` casts the
    saved weights (default: float32).
    """
    from safetensors.torch import save_file

    config = model.config
    if save_tokenizer is None:
        save_tokenizer = config.vocab_size == GPT2_VOCAB_SIZE
    elif save_tokenizer and config.vocab_size < GPT2_VOCAB_SIZE:
        raise HFConversionError(
            f"vocab mismatch: the model has vocab_size={config.vocab_size} but the GPT-2 tokenizer has "
            f"{GPT2_VOCAB_SIZE} tokens; pass save_tokenizer=False"
        )
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = set(GPT(config).state_dict())
    extra = sorted(set(state) - expected)
    if extra:
        raise HFConversionError(
            f"the model has parameters a GPT-2 checkpoint cannot hold ({extra[:4]}); merge LoRA adapters "
            "first (cgpt.lora.merge_lora) or export the plain GPT"
        )
    state.pop("lm_head.weight", None)  # tied to wte
    if config.mup:
        _fold_mup(state, config)
    out = {}
    for name, tensor in state.items():
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[name] = tensor.to(dtype or torch.float32).contiguous()
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    hf_config = hf_config_dict(config)
    if dtype is not None:
        hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(out, str(out_path / SAFETENSORS_FILE), metadata={"format": "pt"})
    generation_config = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    (out_path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if save_tokenizer:
        _save_tokenizer_files(out_path, config.block_size)
    return out_path


def _save_tokenizer_files(out_path: Path, model_max_length: int) -> None:
    """GPT-2 BPE files plus the small JSON files that make ``AutoTokenizer.from_pretrained`` work offline."""
    from cgpt.data.tokenizer import get_tokenizer

    get_tokenizer().save_hf_files(out_path)
    eos = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,
    }
    (out_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    (out_path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
