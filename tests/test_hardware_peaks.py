"""cgpt.hardware: the GPU peak table, peak FLOP/s by device and dtype, precision dtypes, and the
one place that decides whether torch.compile is on by default."""

from __future__ import annotations

import pytest
import torch

from cgpt import hardware
from cgpt.hardware import gpu_table_peak, peak_flops, precision_dtype, resolve_compile


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Some Future GPU", None),
    ],
)
def test_gpu_table_peak_by_cuda_device_name(name, peak):
    assert gpu_table_peak(name) == peak


def test_peak_flops_uses_the_table_on_known_gpus_and_measures_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv("CGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops("cuda", torch.bfloat16) == 989e12
    assert peak_flops("cuda", torch.float32) == 989e12 / 2
    calls = []
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda device, dtype: calls.append(dtype) or 7.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator")
    assert peak_flops("cuda", torch.bfloat16) == 7.0
    assert peak_flops("cpu", torch.float32) == 7.0 and calls == [torch.bfloat16, torch.float32]


def test_measured_cpu_peak_is_a_plausible_flop_rate():
    flops = hardware.measured_matmul_flops(torch.device("cpu"), torch.float32, n=256, seconds=0.05)
    assert 1e7 < flops < 1e14


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16), ("16-mixed", torch.float16),
     ("32-true", torch.float32), (32, torch.float32)],
)  # fmt: skip
def test_precision_dtype(precision, dtype):
    assert precision_dtype(precision) == dtype


def test_compile_is_on_by_default_for_cuda_only_and_switchable():
    assert resolve_compile("auto", "cuda") is True
    assert resolve_compile(None, "cpu") is False
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile(True, "cpu") is True and resolve_compile("false", "cuda") is False
    assert resolve_compile("on", "cpu") is True
    with pytest.raises(ValueError, match="use true, false or auto"):
        resolve_compile("sometimes", "cpu")


def test_cpu_precision_never_fp16():
    assert hardware.default_precision("cpu") in ("bf16-mixed", "32-true")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        hardware.resolve_precision("16-mixed", "cpu")


def test_cpu_peak_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("CGPT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda device, dtype: calls.append(dtype) or 5e10)
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32) == 5e10 and len(calls) == 1
    assert (tmp_path / "peak_flops.json").is_file()
    # a later run (a busy machine would measure low) reads the kept value instead of measuring
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda device, dtype: calls.append(dtype) or 1e9)
    assert peak_flops(cpu, torch.float32) == 5e10 and len(calls) == 1
    # another dtype or thread count is another key: measured once more
    assert peak_flops(cpu, torch.bfloat16) == 1e9 and len(calls) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert hardware.machine_key(cpu, torch.float32) != hardware.machine_key(cpu, torch.bfloat16)
        assert peak_flops(cpu, torch.float32) == 1e9 and len(calls) == 3
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # capped kernels are another machine too
    assert peak_flops(cpu, torch.float32) == 1e9 and len(calls) == 4
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    # a damaged cache is measured again and rewritten, never a crash
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert peak_flops(cpu, torch.float32) == 1e9 and len(calls) == 5


def test_peak_cache_lives_under_xdg_cache_home_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("CGPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.peak_cache_path() == tmp_path / "cgpt" / "peak_flops.json"


@pytest.mark.parametrize(("bf16", "words"), [(True, "has AVX512_BF16/AMX"), (False, "has no AVX512_BF16/AMX")])
def test_first_lines_say_the_precision_and_why(monkeypatch, bf16, words):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: bf16)
    precision = hardware.default_precision("cpu")
    assert precision == ("bf16-mixed" if bf16 else "32-true")
    line = hardware.explain_precision("auto", precision, "cpu")
    assert line.startswith(f"precision {precision} (auto): this CPU {words}")
    assert hardware.explain_precision("32-true", "32-true", "cpu") == "precision 32-true: set by trainer.precision"


def test_a_onednn_cap_below_bf16_makes_auto_choose_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU emulates bf16 (1.2 GFLOP/s measured): auto picks fp32."""
    hardware.cpu_has_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    try:
        assert hardware.onednn_isa_cap() == "ONEDNN_MAX_CPU_ISA=AVX2"
        assert not hardware.cpu_has_bf16() and hardware.default_precision("cpu") == "32-true"
        line = hardware.explain_precision("auto", "32-true", "cpu")
        assert line == (
            "precision 32-true (auto): ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN below bf16, so bf16 would be emulated "
            "and far slower than fp32"
        )
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap that keeps bf16
        assert hardware.onednn_isa_cap() is None
    finally:
        hardware.cpu_has_bf16.cache_clear()


def test_first_lines_say_the_compile_and_fused_head_decisions():
    assert hardware.explain_compile("auto", "cpu").startswith("compile off (auto): on CPUs")
    assert hardware.explain_compile("auto", "cuda").startswith("compile on (auto): CUDA")
    assert hardware.explain_compile(True, "cpu") == "compile on: set by compile=True"
    assert hardware.explain_fused_loss("auto", "cpu").startswith("fused LM-head loss on (auto)")
    assert hardware.explain_fused_loss("auto", "cuda").startswith("fused LM-head loss off (auto)")
    assert hardware.explain_fused_loss(False, "cpu") == "fused LM-head loss off: set by fused_loss=False"


def test_lm_head_choice_is_the_fastest_measured_and_cached(monkeypatch, tmp_path):
    import cgpt.lm_head

    monkeypatch.setenv("CGPT_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(tokens, d_model, vocab, dtype, chunks, reps=2):
        calls.append((tokens, d_model, vocab, dtype, tuple(chunks)))
        return {"full": 0.30, **{f"fused/{c}": 0.20 + c / 10_000 for c in chunks}}

    monkeypatch.setattr(cgpt.lm_head, "time_heads", fake)
    choice = hardware.choose_lm_head(torch.float32, 384, 50257)
    assert (choice.fused, choice.chunk) == (True, 128) and calls == [(512, 384, 50257, torch.float32, (128, 512))]
    assert "fused/128 213 ms vs full 300 ms, fused/512 251 ms" in choice.describe()
    assert hardware.choose_lm_head(torch.float32, 384, 50257) == choice and len(calls) == 1  # kept per machine
    line = hardware.explain_fused_loss("auto", "cpu", choice)
    assert line.startswith("fused LM-head loss on, 128 tokens per chunk: measured on this CPU")
    assert line.endswith("(auto)")

    # where full logits measure fastest (an AVX2-only CPU in fp32), the run takes them, padded or not
    times = {"full": 0.1, "fused/128": 0.2, "fused/512": 0.15, "full/pad64": 0.12}
    monkeypatch.setattr(cgpt.lm_head, "time_heads", lambda *a, **k: times)
    full = hardware.choose_lm_head(torch.float32, 128, 50257)
    assert (full.fused, full.chunk, full.pad) == (False, None, None) and full.describe().startswith("off (full logits)")
    times = {"full": 0.1, "fused/128": 0.2, "fused/512": 0.15, "full/pad64": 0.08}
    padded = hardware.choose_lm_head(torch.float32, 256, 50257)
    assert (padded.fused, padded.pad) == (False, 64)
    assert padded.describe().startswith("off (full logits, vocabulary padded to a multiple of 64): measured")


def test_time_heads_measures_every_variant():
    from cgpt.lm_head import time_heads

    seconds = time_heads(64, 16, 300, torch.float32, [8, 32], reps=1)
    assert set(seconds) == {"full", "full/pad64", "fused/8", "fused/32"} and all(0 < s < 60 for s in seconds.values())


def test_the_chosen_chunk_reaches_the_model():
    from cgpt.lit_module import CerebrasGPTModule

    module = CerebrasGPTModule(model={"name": "cerebras-gpt-tiny", "vocab_size": 128}, fused_loss=True)
    module.lm_head_chunk, module.lm_head_pad = 32, 64
    module.configure_model()
    assert module.model.lm_head.chunk == 32 and module.model.fused_loss is True
    assert module.model.lm_head.pad_vocab_to == 64
