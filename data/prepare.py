"""Turn raw text into packed WebDataset shards: `python data/prepare.py --input TEXT --out DIR`.

Inputs: .txt files (one document each), .jsonl files (one document per line, field --text-key),
optionally .gz or .zst compressed; folders and globs of them. Default: the built-in Shakespeare
corpus. See README "Preparing your own data".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cgpt.data.prepare import prepare

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CORPUS = REPO_ROOT / "data" / "corpus" / "shakespeare.jsonl.gz"
DEFAULT_OUT = REPO_ROOT / "data" / "prepared" / "shakespeare"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[str(DEFAULT_CORPUS)], help="files, folders or globs")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (meta.json + shards)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (Cerebras-GPT: 2048)")
    p.add_argument("--val-every", type=int, default=20, help="every N-th document goes to validation")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size")
    p.add_argument("--max-doc-chars", type=int, default=0,
                   help="cut documents longer than this at blank lines into several (0: keep whole)")  # fmt: skip
    p.add_argument("--text-key", default="text", help="field of .jsonl records holding the text")
    p.add_argument("--tokenizer-dir", default=None, help="folder with the GPT-2 BPE files (default: bundled)")
    args = p.parse_args(argv)
    try:
        prepare(args.input, args.out, seq_len=args.seq_len, val_every=args.val_every, max_doc_chars=args.max_doc_chars,
                shard_size_mb=args.shard_size_mb, text_key=args.text_key, tokenizer_dir=args.tokenizer_dir)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
