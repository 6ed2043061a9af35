"""Decode throughput: cgpt generate with the KV cache, without it, and transformers' generate.

All three run greedy decoding of the same random-weight model (exported once with cgpt.hf.to_hf,
loaded into ``GPT2LMHeadModel``) and must produce the same tokens. Prints tokens/s (new tokens
over the whole ``generate`` call, prefill included; median of ``--repeats`` runs after a warmup).

    python bench/generate_speed.py                       # 111M shape, batch 1, 32-token prompt, 64 new
    python bench/generate_speed.py --preset tiny --new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from cgpt.config import ModelConfig
from cgpt.generate import generate
from cgpt.hf import to_hf
from cgpt.model import GPT


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cerebras-gpt-111m", help="model shape (random weights)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slow no-cache run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(args.preset)).eval()
    idx = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len))
    with tempfile.TemporaryDirectory() as d:
        to_hf(model, d, save_tokenizer=False)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    n = args.batch * args.new_tokens
    print(
        f"model {args.preset} ({model.num_params() / 1e6:.1f}M params), batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads",
        flush=True,
    )

    results = {}

    def report(name: str, t: float) -> None:
        results[name] = t
        print(f"{name:24s} {n / t:9.1f} tokens/s  ({t * 1000:.0f} ms per call)", flush=True)

    t, ref = _time(lambda: generate(model, idx, args.new_tokens, temperature=0), args.repeats)
    report("cgpt (KV cache)", t)
    if not args.skip_uncached:
        t, out = _time(lambda: generate(model, idx, args.new_tokens, temperature=0, use_cache=False), args.repeats)
        report("cgpt (no cache)", t)
        assert torch.equal(out, ref), "cached and uncached greedy decoding differ"

    def hf_generate() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(
                idx,
                attention_mask=torch.ones_like(idx),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )

    t, out = _time(hf_generate, args.repeats)
    report("transformers generate", t)
    same = torch.equal(out, ref)
    print(f"greedy outputs identical to transformers: {same}")
    speedup = results["transformers generate"] / results["cgpt (KV cache)"]
    print(f"cgpt cache / transformers speed ratio: {speedup:.2f}x")


if __name__ == "__main__":
    main()
