"""Consolidate any cgpt checkpoint (DDP file, FSDP sharded folder, DeepSpeed ZeRO 1/2/3 folder) into
one fp32 single-file checkpoint, and optionally export it to Hugging Face.

    python train/consolidate.py outputs/<run>                       # its resume checkpoint
    python train/consolidate.py outputs/<run>/checkpoints/last.ckpt --out model.ckpt --hf hf_model/

The output loads with ``cgpt.weights.load_gpt(path)``, resumes training under any strategy with
``resume=<path>`` (step, schedule and data position continue; DeepSpeed's Adam moments restart) and
initialises new runs with ``init_from=<path>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cgpt.cli import exits_zero
from cgpt.weights import atomic_save, consolidate_checkpoint, load_gpt, resolve_checkpoint


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt file, an FSDP/DeepSpeed checkpoint folder, or a run folder")
    parser.add_argument("--out", help="output file (default: <checkpoint>.consolidated.ckpt next to it)")
    parser.add_argument("--weights-only", action="store_true", help="drop optimizer and training state")
    parser.add_argument("--hf", metavar="DIR", help="also export a Hugging Face GPT2LMHeadModel folder here")
    args = parser.parse_args(argv)

    try:
        kind, src = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        raise SystemExit(f"consolidate.py: {e}") from None
    if kind == "hf":
        raise SystemExit(f"consolidate.py: {src} is a Hugging Face folder, not a cgpt training checkpoint")
    out = Path(args.out) if args.out else src.with_name(src.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    ckpt = consolidate_checkpoint(src)
    if args.weights_only:
        keep = ("state_dict", "hyper_parameters", "global_step", "cgpt_consolidated")
        ckpt = {k: v for k, v in ckpt.items() if k in keep}
    atomic_save(ckpt, out)
    n = sum(v.numel() for k, v in ckpt["state_dict"].items() if not k.endswith("lm_head.weight"))
    info = ckpt["cgpt_consolidated"]
    print(f"{kind} checkpoint {src} (step {ckpt.get('global_step')}) -> {out}: "
          f"{len(ckpt['state_dict'])} fp32 tensors, {n / 1e6:.2f}M parameters, optimizer state "
          f"{'kept' if info['optimizer'] and not args.weights_only else 'dropped'}", flush=True)  # fmt: skip
    if args.hf:
        from cgpt.hf import to_hf

        print(f"Hugging Face model: {to_hf(load_gpt(out), args.hf)}", flush=True)
    return out


console = exits_zero(main)  # the cgpt-consolidate console script

if __name__ == "__main__":
    main()
