"""The README's "Measured" section and demo output are what bench/readme_tables.py makes of the committed
results (bench/results/*.json, demo-cpu.log): a figure edited by hand, or results committed without
regenerating the README, fail here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figures_come_from_committed_results():
    script = ROOT / "bench" / "readme_tables.py"
    if not script.is_file() or not (ROOT / "README.md").is_file():
        pytest.skip("source tree not available (tests run from an installed copy)")
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
