"""Hugging Face interop: logit parity in both directions (SP and muP), file formats, clear errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from cgpt.config import ModelConfig
from cgpt.hf import HFConversionError, from_hf, to_hf
from cgpt.model import GPT

REPO_ROOT = Path(__file__).resolve().parents[1]

# Random tiny shapes with Cerebras-GPT's settings (not only presets): odd widths, d_ffn != 4*d.
SHAPES = [
    dict(n_layer=1, d_model=32, n_head=2, d_ffn=64, vocab_size=101, block_size=32),
    dict(n_layer=3, d_model=48, n_head=3, d_ffn=100, vocab_size=97, block_size=40),
    dict(n_layer=2, d_model=64, n_head=8, d_ffn=256, vocab_size=128, block_size=64),
]


def _perturbed(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose biases and LayerNorms are non-trivial too (init leaves them 0 / 1)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_config(**kw):
    base = dict(activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    return transformers.GPT2Config(**{**base, **kw})


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s['n_layer']}d{s['d_model']}")
def test_cgpt_to_hf_logit_parity(tmp_path: Path, shape: dict, mup: bool) -> None:
    model = _perturbed(ModelConfig(**shape, mup=mup))
    to_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings is (not mup)
    idx = torch.randint(0, shape["vocab_size"], (2, shape["block_size"]))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # ...and back: the export reloads into cgpt (a muP export unfolds into a muP model) with the same logits.
    back = from_hf(tmp_path)
    assert back.config.mup is mup
    assert back.lm_head.weight is back.transformer.wte.weight
    with torch.no_grad():
        assert (back(idx) - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s['n_layer']}d{s['d_model']}")
def test_hf_to_cgpt_logit_parity(tmp_path: Path, shape: dict) -> None:
    hf_config = _hf_config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["block_size"],
        n_embd=shape["d_model"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_inner=shape["d_ffn"],
    )
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.config.d_ffn == shape["d_ffn"] and not model.config.mup
    idx = torch.randint(0, shape["vocab_size"], (3, shape["block_size"]))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_mup_export_is_a_standard_gpt2(tmp_path: Path) -> None:
    """The folded muP export has 10x embeddings and an untied head of wte / m_w; the original config rides along."""
    model = _perturbed(ModelConfig(n_layer=1, d_model=512, n_head=8, vocab_size=64, block_size=16, mup=True))
    to_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["scale_attn_weights"] is True
    assert config["cgpt_model_config"]["mup"] is True
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    wte = model.transformer.wte.weight.detach()
    torch.testing.assert_close(state["transformer.wte.weight"], wte * 10)
    torch.testing.assert_close(state["lm_head.weight"], wte / 2.0)  # m_w = 512 / 256


def _export(tmp_path: Path, **kw) -> tuple[GPT, Path]:
    model = _perturbed(ModelConfig(**{**SHAPES[0], **kw}))
    return model, to_hf(model, tmp_path / "hf")


def test_bin_and_sharded_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, src = _export(tmp_path)
    state = load_file(src / "model.safetensors")
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        expected = model(idx)
    # pytorch_model.bin (as published for cerebras/Cerebras-GPT-*), with the usual attention buffers.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    with_buffers = {
        **state,
        "transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32),
        "lm_head.weight": state["transformer.wte.weight"],
    }
    torch.save(with_buffers, bin_dir / "pytorch_model.bin")
    # Sharded safetensors with an index.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((src / "config.json").read_text())
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, shard_dir / shard)
        weight_map.update({k: shard for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for d in (bin_dir, shard_dir):
        with torch.no_grad():
            assert (from_hf(d)(idx) - expected).abs().max().item() < 1e-5
    # A missing shard is named.
    (shard_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HFConversionError, match="model-00002-of-00002.safetensors"):
        from_hf(shard_dir)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_loading_never_unpickles_objects(tmp_path: Path) -> None:
    _, src = _export(tmp_path)
    (src / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(1), "x": _Evil()}, src / "pytorch_model.bin")
    with pytest.raises(HFConversionError, match=r"pytorch_model\.bin.*weights_only=True"):
        from_hf(src)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.pop("cgpt_model_config", None)
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), r"config\.json.*only GPT-2"),
        (dict(activation_function="gelu_new"), r"config\.json.*gelu_new"),
        (dict(n_inner=128), r"shape mismatch for transformer\.h\.0\.mlp\.c_fc"),
        (dict(vocab_size=100), r"vocab mismatch.*100"),
        (dict(n_layer=2), r"missing \['transformer\.h\.1"),
    ],
    ids=["architecture", "activation", "shape", "vocab", "layers"],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path: Path, changes: dict, message: str) -> None:
    _, src = _export(tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(HFConversionError, match=message):
        from_hf(src)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(HFConversionError, match="not a directory"):
        from_hf(tmp_path / "nope")
    _, src = _export(tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(HFConversionError, match=r"no weights found.*model\.safetensors"):
        from_hf(src)
    (src / "config.json").unlink()
    with pytest.raises(HFConversionError, match=r"config\.json is missing"):
        from_hf(src)


def test_untied_hf_checkpoint_is_refused(tmp_path: Path) -> None:
    hf = transformers.GPT2LMHeadModel(
        _hf_config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=False)
    )
    hf.save_pretrained(tmp_path)
    with pytest.raises(HFConversionError, match="untied embeddings"):
        from_hf(tmp_path)


def test_published_shape_gets_its_preset_name(tmp_path: Path) -> None:
    hf = transformers.GPT2LMHeadModel(
        _hf_config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256)
    )
    hf.save_pretrained(tmp_path)
    assert from_hf(tmp_path).config.name == "cerebras-gpt-tiny"


def test_export_writes_an_offline_tokenizer(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, block_size=16))  # GPT-2 vocab
    out = to_hf(model, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token_id == 50256
    with pytest.raises(HFConversionError, match="vocab mismatch"):
        to_hf(GPT(ModelConfig(**SHAPES[0])), tmp_path / "small", save_tokenizer=True)


def _load_convert_cli():
    import cgpt.cli.convert

    return cgpt.cli.convert


def test_convert_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cgpt.lit_module import CerebrasGPTModule
    from cgpt.weights import load_gpt

    cli = _load_convert_cli()
    model, src = _export(tmp_path, mup=True)
    ckpt = tmp_path / "model.ckpt"
    assert cli.main(["from-hf", str(src), str(ckpt)]) == 0
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = model(idx)
        assert (load_gpt(ckpt)(idx) - expected).abs().max().item() < 1e-5
        module = CerebrasGPTModule.load_from_checkpoint(ckpt, map_location="cpu")
        assert module.model_config.mup
        assert (module.model.eval()(idx) - expected).abs().max().item() < 1e-5
    out = tmp_path / "again"
    assert cli.main(["to-hf", str(ckpt), str(out)]) == 0
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    assert cli.main(["to-hf", str(run), str(tmp_path / "from-run")]) == 0  # a run folder: its last.ckpt
    assert (tmp_path / "from-run" / "model.safetensors").is_file()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(idx).logits - expected).abs().max().item() < 1e-4
    assert cli.main(["from-hf", str(tmp_path / "missing"), str(ckpt)]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_bf16_mup_export_reloads(tmp_path: Path) -> None:
    """A reduced-precision muP export still passes the untied-head check (rounded separately) and reloads."""
    from safetensors.torch import load_file

    model, src = _export(tmp_path, mup=True)
    to_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    # Every stored tensor is exactly the fp32 export's, rounded to bf16 (muP multipliers folded first).
    full, half = load_file(src / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert sorted(full) == sorted(half)
    for k, v in full.items():
        assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)), k
    back = from_hf(tmp_path / "bf16")
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        # Measured: 0.048 on logits up to 18 (2.7e-3 relative, bf16's rounding); a lost muP
        # multiplier (x8 on the head here) moves them by whole units.
        assert (back(idx) - model(idx)).abs().max().item() < 0.06


def test_export_refuses_unmerged_lora(tmp_path: Path) -> None:
    from cgpt.lora import LoRAConfig, apply_lora, merge_lora

    model = _perturbed(ModelConfig(**SHAPES[0]))
    apply_lora(model, LoRAConfig())
    with pytest.raises(HFConversionError, match="merge LoRA adapters"):
        to_hf(model, tmp_path / "lora")
    to_hf(merge_lora(model), tmp_path / "merged")
    assert from_hf(tmp_path / "merged").config.d_model == SHAPES[0]["d_model"]
