"""Every strategy on CPU with 2 gloo processes: same first-step loss (same init and data), loss going
down, sharded atomic checkpoints, consolidation, resume after SIGKILL, and resume under another strategy.

Each run is a subprocess (``train/pretrain.py``) with a timeout; the uninterrupted run of every
strategy is the session's ``strategy_runs`` (tests/conftest.py), which the world-size resume tests
also start from. Unit tests of the strategy builder come first (fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO_ROOT,
    STEPS,
    STRATEGY_EXTRA,
    assert_resumed_at,
    consolidate,
    kill_after,
    kill_while_saving_last,
    losses,
    pretrain_args,
    run_script,
    train,
    weights,
)

from cgpt.config import ConfigError

TOL = 1e-5
# Weights after 6 steps under any strategy against DDP's: measured 8.1e-7 (FSDP) and 1.6e-6 (every
# DeepSpeed stage) for weights up to 1.0. One Adam step moves a weight by up to the lr (1e-3 here), so
# a lost or repeated step, a wrong shard or a stale copy is far outside this.
CONSOLIDATED_ATOL = 1e-5


# --- unit: the builder ---------------------------------------------------------------------------
def test_build_strategy_picks_the_cpu_path_and_validates() -> None:
    from cgpt.strategies import build_strategy
    from cgpt.strategies.cpu import CPUFSDP2Strategy
    from cgpt.strategies.ddp import CgptDDPStrategy

    assert build_strategy({"name": "auto"}, "cpu") == "auto"
    assert isinstance(build_strategy({"name": "ddp", "activation_checkpointing": True}, "cpu"), CgptDDPStrategy)
    fsdp = build_strategy({"name": "fsdp", "sharding": "full"}, "cpu", devices=2)
    assert isinstance(fsdp, CPUFSDP2Strategy) and fsdp.process_group_backend == "gloo"
    with pytest.raises(ConfigError, match="offload_optimizer"):
        build_strategy({"name": "fsdp", "offload_optimizer": True}, "cpu")
    with pytest.raises(ConfigError, match="stage"):
        build_strategy({"name": "deepspeed", "stage": 4}, "cpu")
    with pytest.raises(ConfigError, match="stage 3"):
        build_strategy({"name": "deepspeed", "stage": 2, "offload_parameters": True}, "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        build_strategy({"name": "megatron"}, "cpu")


def test_every_strategy_config_file_is_a_registered_spec() -> None:
    """conf/strategy/*.yaml and the registry describe the same strategies (name, stage, offload)."""
    import yaml

    from cgpt.strategies import SPECS, spec_for

    files = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO_ROOT / "conf" / "strategy").glob("*.yaml")}
    assert sorted(files) == sorted(SPECS)
    for name, config in files.items():
        spec = spec_for(config)
        assert spec.name == name, (name, spec)
        assert {k: config.get(k, False) for k in spec.config()} == spec.config(), name


def test_build_deepspeed_config_carries_stage_offload_and_buckets() -> None:
    from cgpt.strategies import build_strategy
    from cgpt.strategies.cpu import CPUDeepSpeedStrategy

    s = build_strategy(
        {"name": "deepspeed", "stage": 3, "offload_optimizer": True, "offload_parameters": True,
         "allgather_bucket_size": 5e7, "reduce_bucket_size": 6e7},
        "cpu", devices=2, micro_batch_size=4,
    )  # fmt: skip
    zero = s.config["zero_optimization"]
    assert isinstance(s, CPUDeepSpeedStrategy) and zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["allgather_bucket_size"] == 50_000_000 and zero["reduce_bucket_size"] == 60_000_000


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    from cgpt.config import ModelConfig
    from cgpt.model import GPT
    from cgpt.strategies import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = ModelConfig(name="t", n_layer=2, d_model=32, n_head=2, vocab_size=64, block_size=16)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    assert apply_activation_checkpointing(b) == 2
    assert list(a.state_dict()) == list(b.state_dict())  # no wrapper prefix
    idx = torch.randint(0, 64, (2, 16))
    a.loss(idx[:, :-1], idx[:, 1:]).backward()
    b.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


# --- multi-process runs: the session's strategy_runs (tests/conftest.py), one per strategy ----------
@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_same_first_loss_across_strategies_and_loss_decreases(strategy_runs: dict[str, Path]) -> None:
    ref = losses(strategy_runs["ddp"])
    assert sorted(ref) == list(range(STEPS))
    assert ref[STEPS - 1] < ref[0] - 0.05, ref  # it learns
    for name, out in strategy_runs.items():
        got = losses(out)
        assert abs(got[0] - ref[0]) < TOL, (name, got[0], ref[0])  # same init, same data
        assert got[STEPS - 1] < got[0] - 0.05, (name, got)
        # The final validation runs after fit (trainer.validate): the trained weights, not a re-init.
        val, ref_val = (json.loads((o / "summary.json").read_text())["val_loss"] for o in (out, strategy_runs["ddp"]))
        assert abs(val - ref_val) < TOL, (name, val, ref_val)
        for step in ref:  # same math over 6 steps (reductions may sum in another order: ~1e-6)
            assert abs(got[step] - ref[step]) < TOL, (name, step, got[step], ref[step])


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_sharded_checkpoints_are_complete_folders_and_keep_last_k(strategy_runs: dict[str, Path]) -> None:
    from cgpt.weights import is_complete_checkpoint, resume_checkpoint

    for name, out in strategy_runs.items():
        ckpts = out / "checkpoints"
        assert resume_checkpoint(ckpts) == ckpts / "last.ckpt", name
        steps = sorted(p.name for p in ckpts.glob("step*.ckpt"))
        assert steps == ["step0000004.ckpt", "step0000006.ckpt"], (name, steps)  # keep_last=2
        assert list(ckpts.glob("best-*.ckpt")), name
        assert not list(ckpts.glob(".*")), (name, list(ckpts.glob(".*")))  # no temp/old leftovers
        last = ckpts / "last.ckpt"
        assert is_complete_checkpoint(last)
        assert last.is_dir() == (name != "ddp"), name  # FSDP and DeepSpeed save sharded folders


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_consolidate_every_format_to_the_same_fp32_weights(strategy_runs: dict[str, Path], tmp_path: Path) -> None:
    """train/consolidate.py on every format: one fp32 file with DDP's weights and the training state,
    and with --hf a folder transformers computes DDP's logits from."""
    import transformers

    from cgpt.model import GPT
    from cgpt.weights import source_model_config

    ref = weights(strategy_runs["ddp"] / "checkpoints" / "last.ckpt")
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_model = GPT(source_model_config(strategy_runs["ddp"])).eval()
    ref_model.load_state_dict(ref)
    with torch.no_grad():
        ref_logits = ref_model(idx)
    for name, out in strategy_runs.items():
        dst = tmp_path / f"{name}.ckpt"
        consolidate(str(out), "--out", str(dst), "--hf", str(tmp_path / f"hf-{name}"))
        with torch.no_grad():
            theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / f"hf-{name}").eval()(idx).logits
        # Measured: 6.1e-6 (FSDP) and 1.2e-5 (DeepSpeed) on logits below 1.0.
        torch.testing.assert_close(theirs, ref_logits, atol=1e-4, rtol=0, msg=name)
        ckpt = torch.load(dst, map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == STEPS and "PackedDataModule" in ckpt, name
        assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
        assert not any("_orig_mod" in k or "_forward_module" in k for k in ckpt["state_dict"]), name
        got = weights(dst)
        assert list(got) == list(ref)
        for k in ref:  # see CONSOLIDATED_ATOL
            torch.testing.assert_close(got[k], ref[k], atol=CONSOLIDATED_ATOL, rtol=0, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_init_from_a_sharded_run_folder_loads_its_consolidated_weights(strategy_runs: dict[str, Path]) -> None:
    from cgpt.weights import load_source, resolve_checkpoint, source_model_config

    ref = weights(strategy_runs["ddp"] / "checkpoints" / "last.ckpt")
    for name, out in strategy_runs.items():
        assert resolve_checkpoint(out)[1] == out / "checkpoints" / "last.ckpt", name
        assert source_model_config(out).name == "cerebras-gpt-tiny", name
        got = load_source(out)[1]  # FSDP / DeepSpeed folders are consolidated in memory
        for k in ref:
            torch.testing.assert_close(got[k].float(), ref[k], atol=CONSOLIDATED_ATOL, rtol=0, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_sigkill_mid_training_then_rerun_matches_uninterrupted(
    strategy_runs: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """FSDP (sharded, atomic folders): kill -9 after the step-2 checkpoint, re-run the same command."""
    out = tmp_path / "killed"
    args = pretrain_args(tiny_data_dir, out, "fsdp")
    kill_after(args, out / "checkpoints" / "step0000002.ckpt")
    proc = run_script(args, timeout=400)
    assert "resuming from" in proc.stdout
    # It continued at step 2 (a re-run from step 0 would log the same losses: runs are deterministic);
    # equal losses from there prove the restored weights, optimizer, schedule and data position.
    got, ref = assert_resumed_at(out, 2), losses(strategy_runs["fsdp"])
    for step in got:
        assert abs(got[step] - ref[step]) < TOL, (step, got[step], ref[step])
    a, b = weights(out / "checkpoints" / "last.ckpt"), weights(strategy_runs["fsdp"] / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_resume_under_another_strategy_from_a_consolidated_checkpoint(
    strategy_runs: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    # FSDP sharded step-4 checkpoint -> one file (optimizer state kept) -> resumed with DDP: exact.
    src = tmp_path / "fsdp_step4.ckpt"
    consolidate(str(strategy_runs["fsdp"] / "checkpoints" / "step0000004.ckpt"), "--out", str(src))
    out = tmp_path / "ddp_from_fsdp"
    proc = train(tiny_data_dir, out, "ddp", 2, f"resume={src}")
    assert "resuming from" in proc.stdout
    ref, got = losses(strategy_runs["fsdp"]), assert_resumed_at(out, 4)
    for step in got:
        assert abs(got[step] - ref[step]) < TOL, (step, got[step], ref[step])
    # DeepSpeed ZeRO-3 step-4 checkpoint -> one file (weights only) -> resumed with FSDP: same weights,
    # step, schedule and data, so the first resumed loss matches; Adam moments restart.
    src = tmp_path / "ds3_step4.ckpt"
    consolidate(str(strategy_runs["deepspeed_stage_3"] / "checkpoints" / "step0000004.ckpt"), "--out", str(src))
    out = tmp_path / "fsdp_from_ds3"
    train(tiny_data_dir, out, "fsdp", 2, f"resume={src}")
    ref, got = losses(strategy_runs["deepspeed_stage_3"]), assert_resumed_at(out, 4)
    assert abs(got[4] - ref[4]) < TOL, (got, ref)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_zero3_killed_while_writing_last_ckpt_resumes_from_its_own_folder(
    strategy_runs: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The requeue path of a ZeRO-3 run: kill -9 while the step-4 last.ckpt folder is being written,
    re-run the same command. The half-written folder is ignored, the previous last.ckpt (step 2) is
    intact, and the run continues from it exactly as the uninterrupted one did."""
    from cgpt.weights import is_complete_checkpoint

    name = "deepspeed_stage_3"
    out, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    args = pretrain_args(tiny_data_dir, out, name, 2, *STRATEGY_EXTRA[name])
    leftovers = kill_while_saving_last(args, ckpts, 4)
    assert leftovers, "the kill came after the save finished: nothing to prove"
    assert is_complete_checkpoint(ckpts / "last.ckpt")  # the step-2 one, untouched by the cut-short save
    proc = run_script(args, timeout=400)
    assert f"resuming from {ckpts / 'last.ckpt'}" in proc.stdout
    got, ref = assert_resumed_at(out, 2), losses(strategy_runs[name])
    for step in got:
        assert abs(got[step] - ref[step]) < TOL, (step, got[step], ref[step])
    assert not list(ckpts.glob(".*")), list(ckpts.glob(".*"))  # the leftover was cleared by the next save
    a, b = weights(ckpts / "last.ckpt"), weights(strategy_runs[name] / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_zero3_offload_resumes_after_sigkill_with_zero3_losses(
    strategy_runs: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """deepspeed_stage_3_offload (parameters and optimizer on the CPU, DeepSpeedCPUAdam): kill -9 after
    the step-2 checkpoint, re-run; it continues at step 2 with the losses and final weights of ZeRO-3
    without offload (the shared runs), within TOL."""
    out = tmp_path / "offload"
    args = pretrain_args(tiny_data_dir, out, "deepspeed_stage_3_offload")
    kill_after(args, out / "checkpoints" / "step0000002.ckpt")
    proc = run_script(args, timeout=400)
    assert "resuming from" in proc.stdout
    got, ref = assert_resumed_at(out, 2), losses(strategy_runs["deepspeed_stage_3"])
    for step in got:
        assert abs(got[step] - ref[step]) < TOL, (step, got[step], ref[step])
    zero3 = strategy_runs["deepspeed_stage_3"]
    a, b = weights(out / "checkpoints" / "last.ckpt"), weights(zero3 / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=CONSOLIDATED_ATOL, rtol=0, msg=k)


@pytest.mark.slow  # several seconds: make test runs it, make test-fast does not
def test_compile_prefixes_never_reach_a_checkpoint(tmp_path: Path) -> None:
    from cgpt.lit_module import CerebrasGPTModule
    from cgpt.weights import consolidate_checkpoint

    module = CerebrasGPTModule(model={"name": "cerebras-gpt-tiny"}, compile=True)
    module.configure_model()  # compiles in place
    keys = list(module.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    # A checkpoint written by code that compiled with a wrapper still consolidates to clean names.
    leaked = {"state_dict": {f"model._orig_mod.{k[len('model.') :]}": v for k, v in module.state_dict().items()},
              "hyper_parameters": dict(module.hparams)}  # fmt: skip
    torch.save(leaked, tmp_path / "leaky.ckpt")
    clean = consolidate_checkpoint(tmp_path / "leaky.ckpt")["state_dict"]
    assert sorted(clean) == sorted(keys)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared DDP run
def test_lora_trains_the_same_under_ddp_fsdp_and_zero3(ddp_run: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """LoRA with a frozen base on trained weights (init_from the session's DDP run): the same losses
    under every strategy, adapters move, the base does not. The real use, LoRA on published weights:
    under FSDP and ZeRO-3 the base is loaded into partitioned storage, then adapters start fresh."""
    from cgpt.weights import consolidate_checkpoint, gpt_state_dict

    names = ["ddp", "fsdp", "deepspeed_stage_3"]
    finals = {}
    for name in names:
        out = tmp_path / name
        train(tiny_data_dir, out, name, 2, "lora=attention", "optim.lr=0.01", f"init_from={ddp_run}")
        ckpts = out / "checkpoints"
        first, last = (
            gpt_state_dict(consolidate_checkpoint(ckpts / f)["state_dict"]) for f in ("step0000004.ckpt", "last.ckpt")
        )
        adapters = [k for k in last if ".lora_" in k]
        assert adapters and all(".attn." in k for k in adapters), (name, adapters)
        assert all(last[k].abs().max() > 0 for k in adapters if k.endswith("lora_B")), name  # B starts at 0
        for k in last:
            if ".lora_" in k:
                assert not torch.equal(first[k], last[k]), (name, k)  # trained between steps 4 and 6
            else:
                torch.testing.assert_close(first[k], last[k], atol=0, rtol=0, msg=f"{name}: frozen {k} moved")
        finals[name] = (losses(out), last)
    scratch = losses(ddp_run)[0]  # the same first batch on freshly initialised weights
    ref_losses, ref_state = finals["ddp"]
    assert sorted(ref_losses) == list(range(STEPS))
    for name, (got, state) in finals.items():
        assert got[0] < scratch - 0.01, (name, got[0], scratch)  # it starts from the trained weights
        assert sorted(got) == sorted(ref_losses), name
        for step in got:
            assert abs(got[step] - ref_losses[step]) < TOL, (name, step, got[step], ref_losses[step])
        for k in ref_state:
            torch.testing.assert_close(state[k].float(), ref_state[k].float(), atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    fsdp, zero3 = finals["fsdp"][0], finals["deepspeed_stage_3"][0]  # the two sharded runs agree with each other
    for step, loss in fsdp.items():
        assert abs(zero3[step] - loss) < TOL, (step, zero3[step], loss)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test pays for the shared runs
def test_every_weights_source_works_in_every_job_that_takes_a_model(
    strategy_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One resolver (cgpt.weights.load_source) behind init_from, evaluate, generate, convert and
    consolidate: each takes a .ckpt file, an FSDP folder, a DeepSpeed folder, a run folder, a Hugging
    Face folder and a LoRA-trained checkpoint, and computes with that source's weights."""
    import transformers

    from cgpt.cli import consolidate as consolidate_cli
    from cgpt.cli import convert as convert_cli
    from cgpt.cli import evaluate as evaluate_cli
    from cgpt.cli import generate as generate_cli
    from cgpt.data.tokenizer import get_tokenizer
    from cgpt.evaluate import evaluate_task
    from cgpt.generate import complete
    from cgpt.lit_module import CerebrasGPTModule
    from cgpt.model import GPT
    from cgpt.weights import load_gpt, source_model_config

    task = REPO_ROOT / "tests" / "data" / "tiny_multiple_choice.jsonl"
    last = {name: out / "checkpoints" / "last.ckpt" for name, out in strategy_runs.items()}
    hf = tmp_path / "hf"
    assert convert_cli.main(["to-hf", str(last["ddp"]), str(hf)]) == 0
    torch.manual_seed(1)
    lora = CerebrasGPTModule(model={"name": "cerebras-gpt-tiny"}, lora={"rank": 2, "targets": ["all"]})
    lora.configure_model()
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.05)  # adapters that change the outputs
    torch.save({"state_dict": lora.state_dict(), "hyper_parameters": dict(lora.hparams)}, tmp_path / "lora.ckpt")
    sources = {"ckpt file": last["ddp"], "fsdp folder": last["fsdp"], "run folder": strategy_runs["fsdp"],
               "hf folder": hf, "lora checkpoint": tmp_path / "lora.ckpt",
               "deepspeed folder": last["deepspeed_stage_3"]}  # fmt: skip

    # The resolver against an independent reading of a plain checkpoint file.
    raw = torch.load(last["ddp"], map_location="cpu", weights_only=True)
    plain = GPT(source_model_config(last["ddp"]))
    plain.load_state_dict({k.removeprefix("model."): v for k, v in raw["state_dict"].items()})
    idx = torch.randint(0, 50257, (2, 12))
    torch.testing.assert_close(load_gpt(last["ddp"]).eval()(idx), plain.eval()(idx), rtol=0, atol=0)
    lora.model.eval()
    torch.testing.assert_close(load_gpt(tmp_path / "lora.ckpt").eval()(idx), lora.model(idx), rtol=1e-5, atol=1e-5)

    tok = get_tokenizer()
    for label, src in sources.items():
        ref = load_gpt(src).eval()
        with torch.no_grad():
            expected = ref(idx)
        # init_from
        module = CerebrasGPTModule(model=source_model_config(src).to_dict())
        module.set_init_from(str(src))
        module.configure_model()
        with torch.no_grad():
            torch.testing.assert_close(module.model.eval()(idx), expected, rtol=1e-6, atol=1e-6, msg=label)
        # evaluate
        got = evaluate_cli.main(["--model", str(src), "--tasks", str(task), "--device", "cpu"])["tasks"]
        (result,) = got.values()
        want = evaluate_task(ref, tok, task, 8, None)
        assert (result["acc"], result["acc_norm"]) == (want["acc"], want["acc_norm"]), label
        # generate
        capsys.readouterr()
        assert generate_cli.main([str(src), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out == "ROMEO:" + complete(ref, ["ROMEO:"], 6, temperature=0)[0] + "\n", label
        # convert to Hugging Face
        out = tmp_path / f"hf-{label.replace(' ', '-')}"
        assert convert_cli.main(["to-hf", str(src), str(out), "--no-tokenizer"]) == 0, label
        with torch.no_grad():
            theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits
        torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4, msg=label)
        # consolidate (a Hugging Face folder is not a training checkpoint: said so)
        dst = tmp_path / f"{label.replace(' ', '-')}.ckpt"
        if label == "hf folder":
            with pytest.raises(SystemExit, match="Hugging Face folder"):
                consolidate_cli.main([str(src), "--out", str(dst)])
            continue
        consolidate_cli.main([str(src), "--out", str(dst)])
        with torch.no_grad():
            torch.testing.assert_close(load_gpt(dst).eval()(idx), expected, rtol=1e-6, atol=1e-6, msg=label)
