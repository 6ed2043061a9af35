"""Convert between cgpt checkpoints and Hugging Face GPT-2 folders.

    # a cgpt training checkpoint -> a folder GPT2LMHeadModel.from_pretrained() loads offline
    # (a .ckpt file, an FSDP / DeepSpeed checkpoint folder, or a run folder: its last.ckpt)
    python train/convert.py to-hf outputs/run/checkpoints/last.ckpt exports/my-model

    # a Hugging Face folder (e.g. a downloaded cerebras/Cerebras-GPT-111M) -> a cgpt checkpoint file
    python train/convert.py from-hf /path/to/Cerebras-GPT-111M cerebras-gpt-111m.ckpt

The cgpt file loads with ``cgpt.checkpoint.load_gpt(path)`` and
``CerebrasGPTModule.load_from_checkpoint(path)``; to continue training from it, use it as the
run's initial weights. muP models export as the equivalent standard GPT-2 (see ``cgpt.hf``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from cgpt.checkpoint import load_gpt  # noqa: E402
from cgpt.hf import from_hf, to_hf  # noqa: E402
from cgpt.model import GPT  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_any_checkpoint(source: str | os.PathLike) -> GPT:
    """The GPT of any cgpt checkpoint: a ``.ckpt`` file, an FSDP / DeepSpeed checkpoint folder
    (consolidated in memory), or a run folder (its resume checkpoint)."""
    path = Path(source)
    if path.is_dir() and not (path / ".metadata").exists() and not (path / "latest").exists():
        from cgpt.checkpoint import resume_checkpoint

        found = resume_checkpoint(path / "checkpoints") or resume_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path}: no checkpoint found (looked for checkpoints/last.ckpt and last.ckpt); pass a .ckpt file"
            )
        path = found
    if path.is_file():
        return load_gpt(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a cgpt .ckpt file, a checkpoint folder or a run folder")
    from cgpt.checkpoint import model_state_dict
    from cgpt.config import ModelConfig
    from cgpt.strategies import consolidate_checkpoint

    ckpt = consolidate_checkpoint(path)
    model = GPT(ModelConfig.from_dict(dict(ckpt["hyper_parameters"]["model"])))
    state = model_state_dict(ckpt)
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state)
    return model


def save_cgpt_checkpoint(model: GPT, path: str | os.PathLike) -> Path:
    """Write ``model`` as a Lightning-style checkpoint of :class:`~cgpt.lit_module.CerebrasGPTModule`.

    It holds the weights under ``state_dict`` (``model.`` prefix) and the module's hyperparameters,
    so ``load_gpt`` and ``CerebrasGPTModule.load_from_checkpoint`` both rebuild the model. It has
    no optimizer state or step counters: it is a starting point, not a resume point.
    """
    import lightning

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict(), "optim": None, "scheduler": None, "compile": False},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
            model = load_any_checkpoint(args.checkpoint)
            out = to_hf(
                model, args.out_dir, save_tokenizer=False if args.no_tokenizer else None, dtype=DTYPES[args.dtype]
            )
            print(f"wrote Hugging Face GPT2LMHeadModel ({model.num_params() / 1e6:.1f}M params) to {out}")
        else:
            model = from_hf(args.hf_dir)
            out = save_cgpt_checkpoint(model, args.out_file)
            print(f"wrote cgpt checkpoint ({model.num_params() / 1e6:.1f}M params, {model.config.name}) to {out}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
