"""Print completions of text prompts from a cgpt checkpoint or a Hugging Face GPT-2 folder.

    python train/generate.py outputs/<run>/checkpoints/last.ckpt --prompt "The Pile is"
    python train/generate.py /path/to/Cerebras-GPT-111M --prompt "Hello" --prompt "Once upon a time" \\
        --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1
    echo "Greedy, please:" | python train/generate.py model.ckpt --temperature 0

Several prompts decode together as one left-padded batch; each completion is printed after a
``=== prompt N ===`` line. Decoding stops at ``<|endoftext|>``.
"""

from cgpt.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
