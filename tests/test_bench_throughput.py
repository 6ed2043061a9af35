"""bench/train_throughput.py: sane figures on a CPU, a clean skip of the GPU path, and the MFU
that training itself logs."""

from __future__ import annotations

import importlib.util
import json
import math

import lightning as L
import pytest
import torch
from conftest import REPO_ROOT, run_script

from cgpt.callbacks import ThroughputMonitor
from cgpt.lit_module import CerebrasGPTModule

SCRIPT = REPO_ROOT / "bench" / "train_throughput.py"
TINY = ["--model", "cerebras-gpt-tiny", "--vocab-size", "512", "--seq-len", "32", "--micro-batch", "2"]
# The GPU machine may lack these: the benchmark must not import them.
ABSENT = ("hydra", "omegaconf", "webdataset", "wandb", "deepspeed")


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_benchmark_reports_sane_figures_without_hydra_or_webdataset(tmp_path):
    out = tmp_path / "result.json"
    argv = [str(SCRIPT), *TINY, "--steps", "5", "--warmup", "1", "--repeats", "1", "--log-every", "2"]
    argv += ["--device", "cpu", "--compile", "false", "--json", str(out)]
    code = (
        "import runpy, sys\n"
        f"for name in {ABSENT!r}: sys.modules[name] = None  # importing them now fails\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = run_script(["-c", code], timeout=120)
    assert "cgpt / plain throughput" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["timed_steps"] == 4 and result["compile"] is False
    assert result["peak_source"] == "measured matmul" and result["peak_flops"] > 1e8
    assert result["flops_per_token"] > 6 * result["num_params"] * 0.5
    for name in ("plain", "cgpt"):
        r = result[name]
        assert r["tokens_per_sec"] > 0 and r["step_time_ms"] > 0 and r["peak_memory_mb"] > 0
        assert 0 < r["mfu"] < 1
        assert math.isclose(r["tokens_per_sec"] * r["step_time_ms"] / 1000, 2 * 32, rel_tol=1e-6)
    assert 0 < result["ratio_cgpt_over_plain"] < 10 and len(result["ratio_reps"]) == 1
    assert 0 < result["ratio_cpu_time"] < 10 and len(result["ratio_cpu_time_reps"]) == 1
    assert 0 < result["cgpt"]["mfu_logged_by_callback"] < 1
    # the nanoGPT-configured reference: padded vocabulary, fp32 on CPU, its ratio beside cgpt's
    assert result["nanogpt"]["vocab_size"] == 512 and result["nanogpt"]["fp32_on_cpu"] is True
    assert result["nanogpt"]["tokens_per_sec"] > 0 and 0 < result["ratio_cgpt_over_nanogpt"] < 100
    assert "cgpt / nanoGPT-configured loop (fp32, vocab 512, full logits)" in proc.stdout
    assert "fused LM-head loss" in proc.stderr and "measured on this CPU" in proc.stderr


def test_nanogpt_reference_pads_the_vocabulary_and_uses_full_logits():
    bench = load_bench()
    args = bench.parse_args([*TINY[:2], "--vocab-size", "500", "--seq-len", "16", "--micro-batch", "2"])
    args.compile, args.fused_loss = False, False
    module = bench.build_module(args, torch.device("cpu"))
    ref = bench.build_nanogpt_reference(module, torch.device("cpu"))
    assert ref.config.vocab_size == 512 and module.model_config.vocab_size == 500
    assert ref.fused_loss is False and ref.config.n_layer == module.model_config.n_layer


def test_gpu_path_skips_cleanly_without_cuda(monkeypatch, tmp_path, capsys):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    result = bench.main(["--device", "cuda", "--model", "cerebras-gpt-1.3b", "--seq-len", "2048", "--json", str(out)])
    assert result["skipped"].startswith("CUDA is not available")
    assert json.loads(out.read_text())["skipped"] == result["skipped"]
    assert "skipped" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_benchmark_compiles_and_reports_mfu_from_the_table(tmp_path):
    out = tmp_path / "gpu.json"
    argv = [str(SCRIPT), *TINY, "--device", "cuda", "--steps", "8", "--warmup", "3", "--repeats", "1"]
    run_script([*argv, "--json", str(out)], timeout=600)
    result = json.loads(out.read_text())
    assert result["compile"] is True and result["precision"] == "bf16-mixed"
    assert 0 < result["cgpt"]["mfu"] < 1 and result["cgpt"]["peak_memory_mb"] > 0


def test_bad_settings_are_refused_with_the_flag_to_fix():
    bench = load_bench()
    with pytest.raises(SystemExit, match="--steps"):
        bench.run(bench.parse_args([*TINY, "--device", "cpu", "--steps", "3", "--warmup", "3"]))
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        bench.run(bench.parse_args([*TINY, "--device", "cpu", "--precision", "16-mixed"]))


def test_training_logs_mfu_against_the_given_peak_and_the_training_seq_len():
    """ThroughputMonitor: MFU = tokens/s * flops_per_token(seq_len) / peak; per-step values are
    logged at logging steps and at the last step (not every step)."""
    bench = load_bench()
    torch.manual_seed(0)
    module = CerebrasGPTModule(model={"name": "cerebras-gpt-tiny", "vocab_size": 512}, compile=False)
    module.set_runtime(seq_len=32, global_batch_size=2)
    monitor = ThroughputMonitor(log_every=2, peak_flops_per_device=1e12)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=5, log_every_n_steps=2, gradient_clip_val=1.0,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=bench.loader(bench.SyntheticBatches(512, 2, 32), torch.device("cpu")))
    m = trainer.callback_metrics
    flops = module.model_config.flops_per_token(32)
    assert flops < module.model_config.flops_per_token()  # block_size 128 would overstate it
    assert monitor.tokens_per_sec > 0
    assert math.isclose(float(m["mfu"]), monitor.tokens_per_sec * flops / 1e12, rel_tol=1e-9)
    assert float(m["tokens_seen"]) == 5 * 64  # the last step is logged although 5 % 2 != 0
    assert {"train/loss", "train/ppl", "grad_norm", "lr"} <= set(m)


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_benchmark_reads_prepared_shards_with_the_real_datamodule(tiny_data_dir):
    bench = load_bench()
    argv = ["--model", "cerebras-gpt-tiny", "--micro-batch", "2", "--data", str(tiny_data_dir), "--device", "cpu"]
    result = bench.run(bench.parse_args([*argv, "--steps", "4", "--warmup", "1", "--repeats", "1", "--logger", "none"]))
    assert result["data"] == str(tiny_data_dir) and result["seq_len"] == 64  # the shards' length, not --seq-len
    assert result["plain"]["tokens_per_sec"] > 0 and result["cgpt"]["tokens_per_sec"] > 0


@pytest.mark.slow  # a benchmark subprocess, 38 s under load: make test runs it, make test-fast does not
def test_guard_compare_times_the_cgpt_loop_with_and_without_the_step_guard(tmp_path):
    out = tmp_path / "result.json"
    argv = [str(SCRIPT), *TINY, "--steps", "5", "--warmup", "1", "--repeats", "1", "--log-every", "2"]
    argv += ["--device", "cpu", "--compile", "false", "--guard", "compare", "--json", str(out)]
    argv += ["--guard-action", "rollback", "--snapshot-cost"]
    proc = run_script(argv, timeout=120)
    assert "step time with / without the guard" in proc.stdout and "snapshot of weights + AdamW state" in proc.stdout
    result = json.loads(out.read_text())
    assert result["guard"] == "compare" and result["cgpt_guard"]["tokens_per_sec"] > 0
    assert 0 < result["guard_cost"] < 10 and len(result["guard_cost_reps"]) == 1
    params = result["num_params"]
    assert result["snapshot"]["bytes"] >= 3 * 4 * params and result["snapshot"]["wall_ms"] > 0  # fp32 w + 2 moments
