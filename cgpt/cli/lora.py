"""Merge LoRA adapters into a base model and export it: ``python -m cgpt.lora merge BASE --adapters FILE --out DIR``
(also ``cgpt-lora merge ...``)."""

from __future__ import annotations

import argparse
import os

from torch import nn

from cgpt.hf import to_hf
from cgpt.lora import load_adapters, merge_lora
from cgpt.weights import load_gpt


def merged_model(base: str | os.PathLike, adapters: str | os.PathLike | None = None) -> nn.Module:
    """A plain GPT: ``base`` (any init_from source; a LoRA checkpoint is merged) plus ``adapters``, merged."""
    model = load_gpt(base)
    if adapters is not None:
        load_adapters(model, adapters)
        merge_lora(model)
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m cgpt.lora merge BASE [--adapters FILE] --out DIR``: write a merged Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="python -m cgpt.lora", description="Merge LoRA adapters into a base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="fold adapters into the base and export a Hugging Face GPT2LMHeadModel folder")
    merge.add_argument("base", help="HF folder, cgpt .ckpt or run folder (a LoRA-trained checkpoint is merged as is)")
    merge.add_argument("--adapters", default=None, help="adapters.pt written by a LoRA fine-tune (optional)")
    merge.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    model = merged_model(args.base, args.adapters)
    print(f"merged model written to {to_hf(model, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
