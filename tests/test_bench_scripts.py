"""bench/data_throughput.py, bench/generate_speed.py and bench/mup_coord_check.py, each once on a tiny
shape, in this process: they run, and what each reports as its finding holds."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.slow  # each starts DataLoader workers or times several runs


def test_data_throughput_measures_a_prepared_folder(tiny_data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_script(REPO_ROOT / "bench" / "data_throughput.py")
    assert bench.main(["--data", str(tiny_data_dir), "--seconds", "0.3", "--micro-batch-size", "2",
                       "--model", "cerebras-gpt-tiny"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "data: seq_len 64, micro-batch 2" in out
    rates = [float(m) for m in re.findall(r"in-process:\s+([\d.]+) M tokens/s", out)]
    assert rates and rates[0] > 0, out


def test_generate_speed_decodes_like_transformers(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    bench = load_script(REPO_ROOT / "bench" / "generate_speed.py")
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--preset", "cerebras-gpt-tiny", "--prompt-len", "8",
                                      "--new-tokens", "6", "--repeats", "1"])  # fmt: skip
    bench.main()  # also asserts cached and uncached greedy decoding agree
    out = capsys.readouterr().out
    assert "greedy outputs identical to transformers: True" in out, out


def test_mup_coord_check_keeps_mup_activations_flat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_script(REPO_ROOT / "bench" / "mup_coord_check.py")
    out = tmp_path / "coord.png"
    assert bench.main(["--widths", "32", "128", "--steps", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    print(text)
