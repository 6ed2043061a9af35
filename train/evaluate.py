"""Evaluate a Cerebras-GPT model: held-out loss/perplexity and zero-shot tasks from local JSONL.

    python train/evaluate.py --model outputs/demo --data data/prepared/shakespeare \\
        --tasks tests/data/tiny_multiple_choice.jsonl tests/data/tiny_lambada.jsonl --out eval.json

--model takes a cgpt checkpoint (.ckpt, a run folder with checkpoints/last.ckpt, or a sharded
checkpoint folder) or a Hugging Face folder (config.json + weights, e.g. one written by
cgpt.hf.to_hf or a downloaded cerebras/Cerebras-GPT-* snapshot). Task files: see cgpt/evaluate.py
(multiple choice: context/continuations/gold; LAMBADA: text). For the full lm-evaluation-harness
suites use `python -m cgpt.lm_eval_adapter --model cgpt --model_args pretrained=<path> --tasks ...`.
"""

from cgpt.cli.evaluate import main

if __name__ == "__main__":
    main()
