"""Consolidate any cgpt checkpoint (DDP file, FSDP sharded folder, DeepSpeed ZeRO 1/2/3 folder) into
one fp32 single-file checkpoint, and optionally export it to Hugging Face.

    python train/consolidate.py outputs/<run>                       # its resume checkpoint
    python train/consolidate.py outputs/<run>/checkpoints/last.ckpt --out model.ckpt --hf hf_model/

The output loads with ``cgpt.weights.load_gpt(path)``, resumes training under any strategy with
``resume=<path>`` (step, schedule and data position continue; DeepSpeed's Adam moments restart) and
initialises new runs with ``init_from=<path>``.
"""

from cgpt.cli.consolidate import main

if __name__ == "__main__":
    main()
