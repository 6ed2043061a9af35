"""init_from: HF folders and cgpt checkpoints load strictly, tokenizers are checked, the entry point wires it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.init_from import TokenizerMismatchError, check_tokenizer, load_weights
from cgpt.lit_module import CerebrasGPTModule
from cgpt.model import GPT
from cgpt.weights import WeightMismatchError, load_strict, resolve_checkpoint, source_model_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A randomly initialised HF GPT2LMHeadModel written locally (never from a hub), with GPT-2 tokenizer files."""
    import transformers

    from cgpt.data.tokenizer import get_tokenizer

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a dropped tensor would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("hf") / "gpt2-random"
    model.save_pretrained(out)
    get_tokenizer().save_hf_files(out)
    return out


def _hf_logits(hf_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return hf(idx).logits


def test_pretrain_entry_point_reproduces_hf_logits_before_the_first_step(hf_dir, tiny_data_dir, tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cgpt.training import pretrain_components

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[f"init_from={hf_dir}", f"data.dir={tiny_data_dir}", f"paths.output_dir={tmp_path}",
                       "experiment=smoke", "logger=none"],
        )  # fmt: skip
    module, datamodule = pretrain_components(OmegaConf.to_container(cfg, resolve=True))
    assert module.model_config.d_model == 32 and module.model_config.block_size == 64  # from the source
    module.configure_model()  # where the strategy builds the model; the weights load here
    idx = torch.randint(0, 50257, (2, 20))
    module.model.eval()
    with torch.no_grad():
        ours = module.model(idx)
    torch.testing.assert_close(ours, _hf_logits(hf_dir, idx), rtol=1e-4, atol=1e-4)


def test_missing_and_misshaped_tensors_are_listed(tmp_path) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, d_model=32, n_head=4, vocab_size=97, block_size=16))
    state = dict(model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.wpe.weight"] = torch.zeros(8, 32)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightMismatchError) as e:
        load_strict(GPT(model.config), state, "src")
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.bias" in msg and "extra.weight" in msg
    assert "transformer.wpe.weight: source (8, 32) vs model (16, 32)" in msg


def _tiny_ckpt(path: Path, lora: dict | None = None) -> CerebrasGPTModule:
    torch.manual_seed(0)
    module = CerebrasGPTModule(model={"name": "cerebras-gpt-tiny", "vocab_size": 97, "block_size": 16}, lora=lora)
    module.configure_model()
    if lora:
        with torch.no_grad():
            for n, p in module.model.named_parameters():
                if ".lora_" in n:
                    p.normal_(0, 0.1)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return module


@pytest.mark.parametrize("lora", [None, {"rank": 2, "targets": ["all"]}])
def test_cgpt_checkpoint_loads_exactly_and_lora_is_merged(tmp_path, lora) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    src = _tiny_ckpt(ckpt, lora)
    assert resolve_checkpoint(tmp_path / "run") == ("file", ckpt)  # a run folder means its last.ckpt
    config = source_model_config(ckpt)
    model = GPT(config)
    load_weights(model, tmp_path / "run")
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(model(idx), src.model(idx), rtol=1e-5, atol=1e-5)


def test_tokenizer_mismatch_is_refused(hf_dir, tmp_path) -> None:
    notes = check_tokenizer(hf_dir, "gpt2", 50257, 50256)
    assert "match" in notes[0]
    other = tmp_path / "other"
    other.mkdir()
    for f in hf_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (other / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(TokenizerMismatchError, match="vocabulary differs"):
        check_tokenizer(other, "gpt2", 50257, 50256)
    with pytest.raises(TokenizerMismatchError, match="eos"):
        check_tokenizer(hf_dir, "gpt2", 50257, 0)
    with pytest.raises(TokenizerMismatchError, match="tokenized with"):
        check_tokenizer(hf_dir, "llama", 32000, 2)
