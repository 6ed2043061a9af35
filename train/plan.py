"""Plan a compute-optimal Cerebras-GPT run: tokens, FLOPs, steps, batch, warmup, memory, wall time.

    python train/plan.py model=cerebras_gpt_1.3b gpus=64 gpu=H100_SXM mfu=0.4
    python train/plan.py d_model=1024 n_layer=16 n_head=16 compute=1e20 gpus=8 gpu=A100
    python train/plan.py compare=true          # the seven published sizes against the paper's FLOPs
    python train/plan.py certificate=true      # every preset, field by field, against the published configs

Arguments are key=value (Hydra-style, no Hydra needed; ``--key value`` works too):
  model               preset (cerebras_gpt_111m ... 13b, *_mup, tiny, demo); default cerebras_gpt_111m
  n_layer, d_model, n_head, d_ffn, block_size   a custom shape (without model=) or overrides of
                      the preset; a shape that is not a preset takes the recipe of the published
                      size nearest in parameters
  tokens | compute    budget in tokens or in FLOPs (Cerebras-paper convention); default: 20 tokens
                      per parameter (tokens_per_param=...)
  seq_len, batch_size, lr, warmup_tokens   recipe overrides (defaults: the preset's; warmup 375M tokens)
  gpus, gpu, mfu      wall time on gpus x gpu (a name from cgpt/hardware.py, or peak FLOP/s) at mfu
  micro_batch_size, activation_checkpointing   for the memory estimate (one line per conf/strategy)
  json=true           print the plan as JSON instead of text
"""

from __future__ import annotations

import sys

from cgpt.planning import plan_cli


def main(argv: list[str] | None = None) -> int:
    return plan_cli(sys.argv[1:] if argv is None else argv, usage=__doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
