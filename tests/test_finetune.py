"""train/finetune.py end to end: a tiny model learns to reverse strings, resumes, continues with LoRA, exports."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_script

SHORT_TEMPLATE = ['data.template.user="{content} ="', 'data.template.assistant="{content}"']


def _reverse_task(path: Path) -> Path:
    """All 125 strings of three letters from a-e; the response is the reversed string."""
    letters = "abcde"
    strings = [f"{a} {b} {c}" for a in letters for b in letters for c in letters]
    random.Random(0).shuffle(strings)
    path.write_text("".join(json.dumps({"prompt": s, "response": s[::-1]}) + "\n" for s in strings))
    return path


def _finetune(out: Path, *overrides: str) -> str:
    args = ["train/finetune.py", f"paths.output_dir={out}", "logger=none", "trainer.accelerator=cpu",
            "callbacks.progress.every=50", *overrides]  # fmt: skip
    proc = run_script(args, timeout=240)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_tiny_model_learns_to_reverse_then_resumes_continues_with_lora_and_exports(tmp_path) -> None:
    data = _reverse_task(tmp_path / "reverse.jsonl")
    run = tmp_path / "run"
    common = [f"data.train_file={data}", "data.val_fraction=0.2", "data.pack=false", "data.micro_batch_size=16",
              "data.global_batch_size=16", "data.max_seq_len=32", "model.block_size=64", "optim.lr=3e-3",
              "scheduler.warmup_steps=5", "sft.num_samples=25", "sft.max_new_tokens=8", *SHORT_TEMPLATE]  # fmt: skip
    # Checkpoints at the validations (75, 150): the re-run below resumes from step 150.
    every = ["trainer.validate_every_steps=75", "callbacks.checkpoint.every_n_steps=75"]
    out = _finetune(run, *common, "trainer.max_steps=150", *every)
    assert "SFT data: 100 train / 25 val examples, 0 skipped" in out
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    final = [s for s in samples if s["step"] == 150]
    assert len(final) == 25  # 25 held-out prompts, completed greedily at the last validation
    correct = sum(s["output"].strip() == s["reference"] for s in final)
    assert correct >= 20, final  # reverses strings it never trained on

    # The HF export answers the same (transformers, loaded from the folder written at the end).
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(run / "hf").eval()
    from cgpt.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    s = final[0]
    ids = torch.tensor([tok.encode(s["prompt"])])
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert tok.decode(gen[0, ids.size(1) :].tolist()).replace("<|endoftext|>", "") == s["output"]

    # Re-running with more steps resumes the fine-tune (optimizer, schedule, data position), not init.
    out = _finetune(run, *common, "trainer.max_steps=155", *every)
    assert "resuming from" in out and "initialising weights" not in out
    summary = json.loads((run / "summary.json").read_text())
    # It continued from last.ckpt of step 150: a re-run from step 0 would also end at step 155, but
    # after running 155 steps.
    assert (summary["steps"], summary["steps_this_run"]) == (155, 5), summary
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)  # over target tokens

    # LoRA from the fine-tuned run: base frozen, adapters saved alone, merged export.
    lora_run = tmp_path / "lora"
    out = _finetune(lora_run, *common, f"init_from={run}", "lora=attention", "trainer.max_steps=4",
                    "trainer.validate_every_steps=4", "optim.lr=1e-2", "scheduler.warmup_steps=1")  # fmt: skip
    assert "initialising weights from" in out
    # rank 8 on c_attn (64 -> 192) and c_proj (64 -> 64) of 2 blocks: 2 * 8 * (64 + 192 + 64 + 64) = 6144
    assert "trainable parameters: 0.006M of 3.3" in out
    adapters = torch.load(lora_run / "adapters.pt", weights_only=True)
    assert all(".lora_" in k for k in adapters["state_dict"]) and len(adapters["state_dict"]) == 8
    assert (lora_run / "hf" / "model.safetensors").is_file()
