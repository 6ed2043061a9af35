"""Print completions of text prompts from a cgpt checkpoint or a Hugging Face GPT-2 folder.

    python train/generate.py outputs/<run> --prompt "The Pile is"    # or cgpt-generate; any checkpoint form
    python train/generate.py /path/to/Cerebras-GPT-111M --prompt "Hello" --prompt "Once upon a time" \\
        --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1
    echo "Greedy, please:" | python train/generate.py model.ckpt --temperature 0

Several prompts decode together as one left-padded batch; each completion is printed after a
``=== prompt N ===`` line. Decoding stops at ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from cgpt.generate import complete
from cgpt.weights import load_gpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "model", help="a cgpt .ckpt, FSDP/DeepSpeed checkpoint folder, run folder or Hugging Face GPT-2 folder"
    )
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable); default: read stdin")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix every step (slow; checks)")
    args = parser.parse_args(argv)
    prompts = args.prompt or [sys.stdin.read().rstrip("\n")]
    try:
        model = load_gpt(args.model).eval().to(args.device, DTYPES[args.dtype])
        texts = complete(
            model,
            prompts,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            use_cache=not args.no_cache,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"=== prompt {i} ===")
        print(prompt + text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
