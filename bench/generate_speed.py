"""Decode throughput: cgpt generate with the KV cache, without it, and transformers' generate.

All three run greedy decoding of the same random-weight model (exported once with cgpt.hf.to_hf,
loaded into ``GPT2LMHeadModel``) and must produce the same tokens. Prints tokens/s (new tokens
over the whole ``generate`` call, prefill included; median of ``--repeats`` interleaved runs after a warmup).

    python bench/generate_speed.py                       # 111M shape, batch 1, 32-token prompt, 64 new
    python bench/generate_speed.py --preset tiny --new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from cgpt.config import ModelConfig
from cgpt.generate import generate
from cgpt.hf import to_hf
from cgpt.model import GPT


def _time_interleaved(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Median wall time of each function; rounds interleave the functions so that load changes on
    a shared machine hit all of them alike. One warmup call each first."""
    outs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


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

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "cgpt (KV cache)": lambda: generate(model, idx, args.new_tokens, temperature=0),
        "transformers generate": hf_generate,
    }
    if not args.skip_uncached:
        fns["cgpt (no cache)"] = lambda: generate(model, idx, args.new_tokens, temperature=0, use_cache=False)
    results = _time_interleaved(fns, args.repeats)
    for name, (t, _) in results.items():
        print(f"{name:24s} {n / t:9.1f} tokens/s  ({t * 1000:.0f} ms per call)", flush=True)
    ref = results["cgpt (KV cache)"][1]
    if not args.skip_uncached:
        assert torch.equal(results["cgpt (no cache)"][1], ref), "cached and uncached greedy decoding differ"
    out = results["transformers generate"][1]
    same = torch.equal(out, ref)
    print(f"greedy outputs identical to transformers: {same}")
    speedup = results["transformers generate"][0] / results["cgpt (KV cache)"][0]
    print(f"cgpt cache / transformers speed ratio: {speedup:.2f}x")


if __name__ == "__main__":
    main()
