"""Host test of the CUDA decode kernel's fragment layout and PRMT lookup (csrc/nf4_decode_layout.h): compiles
tests/cpp/decode_layout_test.cpp with g++ and runs it (an mma.sync.m16n8k16 emulation over 32 lanes against a
naive matmul of the reference dequantization). No GPU, no nvcc; skips without a C++ compiler.

The negative control builds the same test with x's k order swapped inside each mma step
(-DQK_DEC_TEST_BREAK_B) and requires it to fail, so the check can tell a wrong permutation."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "cpp" / "decode_layout_test.cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None or not (ROOT / "csrc" / "nf4_decode_layout.h").is_file(),
                                reason="no C++ compiler or no source tree")


def _build_and_run(tmp_path: Path, *defines: str) -> subprocess.CompletedProcess:
    exe = tmp_path / ("layout" + "".join(d.replace("-D", "_") for d in defines))
    subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", *defines, f"-I{ROOT / 'csrc'}", str(SRC), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


def test_decode_fragments_match_naive_matmul(tmp_path):
    res = _build_and_run(tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


def test_layout_test_catches_a_wrong_x_permutation(tmp_path):
    res = _build_and_run(tmp_path, "-DQK_DEC_TEST_BREAK_B")
    assert res.returncode == 1 and "C mismatch" in res.stdout, res.stdout + res.stderr
