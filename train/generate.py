"""Print completions of text prompts from a cgpt checkpoint or a Hugging Face GPT-2 folder.

    python train/generate.py outputs/<run>/checkpoints/last.ckpt --prompt "The Pile is"
    python train/generate.py /path/to/Cerebras-GPT-111M --prompt "Hello" --prompt "Once upon a time" \\
        --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1
    echo "Greedy, please:" | python train/generate.py model.ckpt --temperature 0

Several prompts decode together as one left-padded batch; each completion is printed after a
``=== prompt N ===`` line. Decoding stops at ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from cgpt.config import GPT2_EOS_ID  # noqa: E402
from cgpt.generate import generate  # noqa: E402
from cgpt.model import GPT  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(source: str | Path) -> GPT:
    """A cgpt checkpoint file (``.ckpt``) or a Hugging Face folder (with ``config.json``)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(
                f"{source} is a folder without config.json: pass a Hugging Face folder or a cgpt .ckpt file"
            )
        from cgpt.hf import from_hf

        return from_hf(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: pass a cgpt .ckpt file or a Hugging Face folder")
    from cgpt.checkpoint import load_gpt

    return load_gpt(source)


def complete(
    model: GPT,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """Completions (the new text only) of ``prompts``, decoded as one left-padded batch."""
    from cgpt.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    encoded = tok.encode_batch(prompts)
    if any(len(e) == 0 for e in encoded):
        raise ValueError("empty prompt: give every prompt at least one token of text")
    if max(max(e) for e in encoded) >= model.config.vocab_size:
        raise ValueError(f"the model's vocab ({model.config.vocab_size}) is smaller than the GPT-2 tokenizer's")
    device = next(model.parameters()).device
    longest = max(len(e) for e in encoded)
    max_new_tokens = min(max_new_tokens, model.config.block_size - longest)
    if max_new_tokens <= 0:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room in the model's context ({model.config.block_size})"
        )
    idx = torch.full((len(prompts), longest), GPT2_EOS_ID, dtype=torch.long, device=device)
    for i, e in enumerate(encoded):
        idx[i, longest - len(e) :] = torch.tensor(e, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = GPT2_EOS_ID if model.config.vocab_size > GPT2_EOS_ID else None
    out = generate(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos,
        prompt_lengths=[len(e) for e in encoded],
        use_cache=use_cache,
        generator=generator,
    )
    texts = []
    for row in out[:, longest:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tok.decode(row))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="cgpt checkpoint (.ckpt) or Hugging Face GPT-2 folder")
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
        model = load_model(args.model).to(args.device, DTYPES[args.dtype])
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
