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
    rc = bench.main(["--data", str(tiny_data_dir), "--seconds", "0.3", "--micro-batch-size", "2"])
    out = capsys.readouterr().out
    assert "data: seq_len 64, micro-batch 2" in out
    rates = [float(m) for m in re.findall(r"(?:in-process|worker):\s+([\d.]+) M tokens/s", out)]
    assert len(rates) == 2 and all(r > 0 for r in rates), out
    io = dict(re.findall(r"world (\d): MB read per rank \[[\d, ]+\] = ([\d.]+) of the split", out))
    assert set(io) == {"1", "2", "4", "8"} and float(io["1"]) == 1.0 and float(io["2"]) < 1.0, out  # batch 16 of 2s
    verdict = re.search(r"one DataLoader worker supplies [\d.]+x that \(goal: >= \d+x\): (OK|BELOW GOAL)", out)
    assert verdict and rc == (0 if verdict.group(1) == "OK" else 1), out  # the exit status is the verdict


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
    rows = re.findall(r"^\s+(SP|muP)\s+(block\d)\s.*widest/narrowest\s+([\d.]+)$", capsys.readouterr().out, re.M)
    growth = {(param, name): float(g) for param, name, g in rows}
    assert len(growth) == 4, rows
    # Measured at widths 32 -> 128 after 2 steps: SP blocks grow 3.0x and 4.1x, muP 0.99x and 1.24x.
    for block in ("block0", "block1"):
        assert growth[("SP", block)] > 2.0 and 0.67 < growth[("muP", block)] < 1.5, growth
