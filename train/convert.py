"""Convert between cgpt checkpoints and Hugging Face GPT-2 folders.

    # a cgpt training checkpoint -> a folder GPT2LMHeadModel.from_pretrained() loads offline
    # (a .ckpt file, an FSDP / DeepSpeed checkpoint folder, or a run folder: its last.ckpt)
    python train/convert.py to-hf outputs/run/checkpoints/last.ckpt exports/my-model

    # a Hugging Face folder (e.g. a downloaded cerebras/Cerebras-GPT-111M) -> a cgpt checkpoint file
    python train/convert.py from-hf /path/to/Cerebras-GPT-111M cerebras-gpt-111m.ckpt

The cgpt file loads with ``cgpt.weights.load_gpt(path)`` and
``CerebrasGPTModule.load_from_checkpoint(path)``; to continue training from it, use it as the
run's initial weights. muP models export as the equivalent standard GPT-2 (see ``cgpt.hf``).
"""

from cgpt.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
