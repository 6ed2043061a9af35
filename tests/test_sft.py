"""SFT data (cgpt.data.sft) and loss (cgpt.sft): templates, loss masks, packing isolation, bad-record reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgpt.config import ModelConfig
from cgpt.data.sft import (
    BadRecordsError,
    ChatTemplate,
    SFTDataModule,
    block_causal_mask,
    collate,
    load_examples,
    record_messages,
    tokenize_messages,
)
from cgpt.data.tokenizer import get_tokenizer
from cgpt.lm_head import IGNORE_INDEX
from cgpt.model import GPT
from cgpt.sft import sft_loss

TOK = get_tokenizer()


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _example(prompt: str, response: str, template: ChatTemplate | None = None):
    return tokenize_messages(record_messages({"prompt": prompt, "response": response}), TOK, template or ChatTemplate())


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, d_model=32, n_head=4, block_size=64))


def test_default_template_and_targets_cover_the_response_and_eos_only() -> None:
    ex = _example("2+2?", "4")
    assert TOK.decode(ex.ids) == "### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>"
    targets = [t for t, m in zip(ex.ids, ex.loss_mask) if m]
    assert targets == TOK.encode("4") + [TOK.eos_id]
    assert TOK.decode(ex.prompt_ids) == "### User:\n2+2?\n\n### Assistant:\n"
    chat = record_messages(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye!"}]}
    )  # fmt: skip
    ex = tokenize_messages(chat, TOK, ChatTemplate())
    targets = [t for t, m in zip(ex.ids, ex.loss_mask) if m]
    assert targets == TOK.encode("Hello") + [TOK.eos_id] + TOK.encode("Bye!") + [TOK.eos_id]  # every assistant turn
    assert TOK.decode(ex.ids).startswith("### System:\nBe brief.\n\n### User:\nHi")


def test_prompt_tokens_get_zero_gradient() -> None:
    """Changing the prompt's own next-token targets must not move the loss: only the response counts.

    Without the loss mask the logits at prompt positions would receive gradient and this fails.
    """
    ex = _example("a b c d e f", "f e")
    batch = collate([[ex]], TOK.eos_id, packed=False)
    n_prompt = sum(1 for m in ex.loss_mask if not m)
    assert (batch["targets"][0, : n_prompt - 1] == IGNORE_INDEX).all()
    model = _model()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), batch["targets"].view(-1))
    loss.backward()
    per_position = logits.grad[0].abs().sum(-1)
    assert (per_position[: n_prompt - 1] == 0).all()  # prompt positions: no gradient at all
    assert (per_position[n_prompt - 1 :] > 0).all()  # the header's last token predicts the response: counted
    assert torch.allclose(sft_loss(model, batch)[0], loss)


def test_packed_examples_do_not_see_each_other() -> None:
    """Logits of an example packed after another equal its logits alone (mask + positions)."""
    a, b = _example("one two three four", "five"), _example("x y", "z w")
    model = _model().eval()
    packed = collate([[a, b]], TOK.eos_id, packed=True)
    assert packed["segment_ids"][0].tolist() == [1] * a.length + [2] * b.length
    mask = block_causal_mask(packed["segment_ids"])
    together = model(packed["input_ids"], attn_mask=mask, position_ids=packed["position_ids"])
    alone = model(torch.tensor([b.ids[:-1]]))
    torch.testing.assert_close(together[0, a.length :], alone[0], rtol=1e-5, atol=1e-5)
    # Same loss packed or padded (per-token mean over the same targets).
    padded = collate([[a], [b]], TOK.eos_id, packed=False)
    torch.testing.assert_close(sft_loss(model, packed)[0], sft_loss(model, padded)[0], rtol=1e-5, atol=1e-5)
    # And the mask matters: without it the second example's logits change.
    leaky = model(packed["input_ids"], position_ids=packed["position_ids"])
    assert not torch.allclose(leaky[0, a.length :], alone[0], atol=1e-4)


def test_bad_records_reported_with_line_numbers_and_never_truncated(tmp_path) -> None:
    path = _write(
        tmp_path / "data.jsonl",
        [
            {"prompt": "ok", "response": "fine"},  # 1
            {"prompt": "no response"},  # 2
            "{not json",  # 3
            {"prompt": "p", "response": "   "},  # 4: empty response
            {"prompt": "long " * 100, "response": "r"},  # 5: over-long
            {"messages": [{"role": "user", "content": "no answer"}]},  # 6
            {"messages": [{"role": "robot", "content": "?"}, {"role": "assistant", "content": "x"}]},  # 7
            "",  # blank lines are ignored
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # 9
        ],
    )
    examples, problems = load_examples(path, TOK, ChatTemplate(), max_seq_len=32)
    assert [e.line for e in examples] == [1, 9]
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems] == ["2", "3", "4", "5", "6", "7"]
    assert "missing field(s) ['response']" in problems[0] and "invalid JSON" in problems[1]
    assert "empty response" in problems[2] and "exceed max_seq_len 32" in problems[3]
    assert "no assistant" in problems[4] and "unknown role 'robot'" in problems[5]
    with pytest.raises(BadRecordsError, match=r"6 bad record\(s\)") as e:
        load_examples(path, TOK, ChatTemplate(), max_seq_len=32, on_bad_record="error")
    assert f"{path}:5:" in str(e.value)


def test_datamodule_split_batches_and_resume(tmp_path) -> None:
    records = [{"prompt": f"say {i}", "response": f"{i}"} for i in range(40)]
    path = _write(tmp_path / "d.jsonl", records + [{"prompt": "bad"}])
    logs: list[str] = []
    dm = SFTDataModule(str(path), max_seq_len=32, val_fraction=0.1, micro_batch_size=4, pack=True, seed=3,
                       log=logs.append)  # fmt: skip
    assert len(dm.val_examples) == 4 and len(dm.train_examples) == 36 and len(dm.problems) == 1
    assert any(":41: missing field" in m for m in logs)
    assert not {e.line for e in dm.val_examples} & {e.line for e in dm.train_examples}
    it = iter(dm.train_dataloader())
    first = [next(it) for _ in range(3)]
    assert first[0]["input_ids"].size(1) <= 32 and "segment_ids" in first[0]
    dm.load_state_dict({"consumed_micro_batches": 2, "world_size": 1, "micro_batch_size": 4, "seed": 3})
    resumed = next(iter(dm.train_dataloader()))
    assert resumed["batch_index"] == 2 and torch.equal(resumed["input_ids"], first[2]["input_ids"])
    assert 0 < dm.positions_per_row() <= 32
    val = list(dm.val_dataloader())
    assert sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in val) == sum(sum(e.loss_mask) for e in dm.val_examples)


def test_template_must_place_content() -> None:
    with pytest.raises(ValueError, match="must end with"):
        ChatTemplate(assistant="A: {content}\n")
    with pytest.raises(ValueError, match="exactly once"):
        ChatTemplate(user="User:")
