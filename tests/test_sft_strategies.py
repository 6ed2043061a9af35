"""SFT's loss weighting over micro-batches and ranks, and train/finetune.py under DDP and FSDP (packed).

A step's loss is the per-token mean over its whole global batch (cgpt.sft.SFTModule.training_step,
with ``step_targets`` from cgpt.data.sft), so one process accumulating four micro-batches and two
processes accumulating two each make the same updates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script

from cgpt.data.sft import ChatTemplate, _Batches, record_messages, tokenize_messages
from cgpt.data.tokenizer import get_tokenizer


def _records(n: int) -> list[dict[str, str]]:
    """Responses of 1 to 9 words: micro-batches hold very different numbers of target tokens."""
    return [{"prompt": f"count {i}", "response": " ".join(["yes"] * (1 + i % 9))} for i in range(n)]


def test_step_targets_count_the_whole_global_batch_on_any_layout() -> None:
    """One process accumulating 4 micro-batches and 2 ranks accumulating 2 see the same steps, and
    every micro-batch carries the target tokens of its whole step (all ranks), not its own."""
    tok = get_tokenizer()
    examples = [tokenize_messages(record_messages(r), tok, ChatTemplate()) for r in _records(60)]
    args = (examples, 2, 32, True, tok.eos_id, 0)
    one = _Batches(*args, rank=0, world=1, accumulate=4)
    two = [_Batches(*args, rank=r, world=2, accumulate=2) for r in (0, 1)]
    steps = 5
    mb_one = [b for _, b in zip(range(4 * steps), one)]
    mb_two = [[b for _, b in zip(range(2 * steps), it)] for it in two]
    for s in range(steps):
        group = mb_one[4 * s : 4 * s + 4]
        own = [int((b["targets"] != -100).sum()) for b in group]
        assert len(set(own)) > 1, own  # the weighting matters here
        assert all(int(b["step_targets"]) == sum(own) for b in group), (s, own)
        # the same micro-batches, dealt to two ranks: rank r's i-th is batch 2 i + r of the step
        dealt = [mb_two[r][2 * s + i] for i in range(2) for r in range(2)]
        for a, b in zip(group, dealt):
            assert torch.equal(a["input_ids"], b["input_ids"]) and int(b["step_targets"]) == sum(own)
    # A resume starts mid-stream with the same counts.
    resumed = _Batches(*args, rank=1, world=2, accumulate=2, start=3)
    first = next(iter(resumed))
    assert first["batch_index"] == 3 and int(first["step_targets"]) == int(mb_two[1][3]["step_targets"])


def test_training_step_returns_the_share_of_the_global_token_mean() -> None:
    """Summing what training_step returns, each divided by the accumulation (as Lightning does), gives
    the gradient of the per-token mean over the step; a mean of micro-batch means would not."""
    from types import SimpleNamespace

    from cgpt.data.sft import collate
    from cgpt.lm_head import IGNORE_INDEX
    from cgpt.sft import SFTModule, sft_loss

    tok = get_tokenizer()
    examples = [tokenize_messages(record_messages(r), tok, ChatTemplate()) for r in _records(6)]
    module = SFTModule(model={"name": "t", "n_layer": 1, "d_model": 32, "n_head": 2, "block_size": 64})
    module.configure_model()
    module._trainer = SimpleNamespace(accumulate_grad_batches=3, world_size=1, log_every_n_steps=0, max_steps=0,
                                      global_step=0)  # fmt: skip
    batches = [collate([[examples[2 * i]], [examples[2 * i + 1]]], tok.eos_id, packed=False) for i in range(3)]
    total = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    for b in batches:
        (module.training_step({**b, "step_targets": torch.tensor(total)}, 0) / 3).backward()
    got = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    full = collate([[e] for e in examples], tok.eos_id, packed=False)
    sft_loss(module.model, full)[0].backward()
    for g, p in zip(got, module.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


# --- end to end: 1 process against 2 (DDP, FSDP) ------------------------------------------------------
STEPS = 3


def _finetune(data: Path, out: Path, strategy: str, devices: int, micro_batch_size: int) -> dict:
    run_script(["train/finetune.py", f"paths.output_dir={out}", f"data.train_file={data}", "data.val_fraction=0.2",
                "data.pack=true", "data.max_seq_len=32", "model.block_size=32", "data.global_batch_size=8",
                f"data.micro_batch_size={micro_batch_size}", "trainer.accelerator=cpu", "trainer.precision=32-true",
                f"trainer.devices={devices}", f"strategy={strategy}", f"trainer.max_steps={STEPS}",
                f"trainer.validate_every_steps={STEPS}", "optim.lr=3e-3", "scheduler.warmup_steps=0",
                "sft.num_samples=0", "export_hf=null", "logger=none", "callbacks.progress.every=50"],
               timeout=300)  # fmt: skip
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_sft_under_ddp_and_fsdp_makes_the_single_process_updates(tmp_path: Path) -> None:
    """Packed SFT, global batch 8: one process with the whole batch in one micro-batch (the per-token
    mean itself) against DDP and FSDP on 2 gloo processes accumulating 2 micro-batches of 2 rows each.
    Same final weights and validation loss: the token-weighted mean does not depend on how the global
    batch is split (a mean of micro-batch means would)."""
    from cgpt.weights import load_source

    data = tmp_path / "count.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(80)))
    ref = _finetune(data, tmp_path / "one", "auto", 1, 8)
    ref_weights = load_source(tmp_path / "one")[1]
    for strategy in ("ddp", "fsdp"):
        got = _finetune(data, tmp_path / strategy, strategy, 2, 2)
        assert got["steps"] == STEPS and got["config"]["resolved"]["accumulate_grad_batches"] == 2
        # Measured: equal validation losses and weights within 9.4e-7 (fp32, another reduction order);
        # a mean of micro-batch means instead moved weights by 1.1e-2 and the validation loss by 0.1.
        assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5), (strategy, got["val_loss"], ref["val_loss"])
        weights = load_source(tmp_path / strategy)[1]
        for k, v in ref_weights.items():
            torch.testing.assert_close(weights[k], v, atol=1e-5, rtol=0, msg=f"{strategy}: {k}")
    assert ref["config"]["resolved"]["accumulate_grad_batches"] == 1
