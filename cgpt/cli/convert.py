"""Convert between cgpt checkpoints and Hugging Face GPT-2 folders.

    # a cgpt training checkpoint -> a folder GPT2LMHeadModel.from_pretrained() loads offline
    # (a .ckpt file, an FSDP / DeepSpeed checkpoint folder, or a run folder: its last.ckpt)
    python train/convert.py to-hf outputs/run/checkpoints/last.ckpt exports/my-model

    # a Hugging Face folder (e.g. a downloaded cerebras/Cerebras-GPT-111M) -> a cgpt checkpoint file
    python train/convert.py from-hf /path/to/Cerebras-GPT-111M cerebras-gpt-111m.ckpt

The cgpt file loads with ``cgpt.weights.load_gpt(path)`` and
``CerebrasGPTModule.load_from_checkpoint(path)``; to continue training from it, use it as the
run's initial weights (``init_from=``). muP models export as the equivalent standard GPT-2 (see ``cgpt.hf``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from cgpt.hf import from_hf, to_hf
from cgpt.weights import load_gpt, save_gpt_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="cgpt checkpoint (.ckpt) -> Hugging Face folder")
    to.add_argument(
        "checkpoint", help="cgpt checkpoint: a .ckpt file, an FSDP/DeepSpeed checkpoint folder, or a run folder"
    )
    to.add_argument("out_dir", help="folder to write config.json, model.safetensors and tokenizer files to")
    to.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    to.add_argument("--no-tokenizer", action="store_true", help="do not write the GPT-2 tokenizer files")
    fr = sub.add_parser("from-hf", help="Hugging Face folder -> cgpt checkpoint file")
    fr.add_argument("hf_dir", help="folder with config.json and model.safetensors / pytorch_model.bin (or shards)")
    fr.add_argument("out_file", help="cgpt checkpoint to write, e.g. cerebras-gpt-111m.ckpt")
    args = parser.parse_args(argv)

    try:
        if args.command == "to-hf":
            model = load_gpt(args.checkpoint)
            out = to_hf(
                model, args.out_dir, save_tokenizer=False if args.no_tokenizer else None, dtype=DTYPES[args.dtype]
            )
            print(f"wrote Hugging Face GPT2LMHeadModel ({model.num_params() / 1e6:.1f}M params) to {out}")
        else:
            model = from_hf(args.hf_dir)
            out = save_gpt_checkpoint(model, args.out_file)
            print(f"wrote cgpt checkpoint ({model.num_params() / 1e6:.1f}M params, {model.config.name}) to {out}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
