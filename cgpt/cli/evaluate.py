"""Evaluate a Cerebras-GPT model: held-out loss/perplexity and zero-shot tasks from local JSONL.

    python train/evaluate.py --model outputs/demo --data data/prepared/shakespeare \\
        --tasks tests/data/tiny_multiple_choice.jsonl tests/data/tiny_lambada.jsonl --out eval.json

--model takes a cgpt checkpoint (.ckpt, a run folder with checkpoints/last.ckpt, or a sharded
checkpoint folder) or a Hugging Face folder (config.json + weights, e.g. one written by
cgpt.hf.to_hf or a downloaded cerebras/Cerebras-GPT-* snapshot). Task files: see cgpt/evaluate.py
(multiple choice: context/continuations/gold; LAMBADA: text). For the full lm-evaluation-harness
suites use `python -m cgpt.lm_eval_adapter --model cgpt --model_args pretrained=<path> --tasks ...`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cgpt.cli import exits_zero
from cgpt.evaluate import TaskFormatError, evaluate_task, load_model, validation_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="cgpt checkpoint / run folder, or Hugging Face folder")
    p.add_argument("--data", help="prepared shard folder (meta.json) for validation loss")
    p.add_argument("--split", default="val", help="split of --data to score (default: val)")
    p.add_argument("--max-batches", type=int, default=None, help="cap on validation micro-batches")
    p.add_argument("--tasks", nargs="*", default=[], help="task JSONL files (multiple choice or LAMBADA)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if not args.data and not args.tasks:
        p.error("nothing to evaluate: give --data (validation loss) and/or --tasks")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        model = load_model(args.model, args.device, DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"evaluate.py: cannot load --model {args.model}: {e}") from None
    results: dict = {"model": args.model, "params": sum(p.numel() for p in model.parameters())}
    if args.data:
        t0 = time.perf_counter()
        val = validation_loss(model, args.data, args.split, args.batch_size, args.max_batches)
        results["validation"] = {"data": args.data, "split": args.split, **val}
        print(
            f"{args.split} loss {val['loss']:.4f} nats/token, perplexity {val['ppl']:.2f} "
            f"({val['tokens']:,} tokens, {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    if args.tasks:
        from cgpt.data.tokenizer import get_tokenizer

        tok = get_tokenizer()
        results["tasks"] = {}
        for path in args.tasks:
            t0 = time.perf_counter()
            try:
                r = evaluate_task(model, tok, path, args.batch_size, args.limit)
            except (FileNotFoundError, TaskFormatError) as e:
                raise SystemExit(f"evaluate.py: {e}") from None
            results["tasks"][r["task"]] = r
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k in ("acc", "acc_norm", "ppl"))
            print(f"{r['task']} ({r['kind']}, {r['examples']} examples): {metrics} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.out}")
    return results


console = exits_zero(main)  # the cgpt-evaluate console script

if __name__ == "__main__":
    main()
