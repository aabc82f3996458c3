"""The repository passes its linter: ``ruff check`` with the rules and line length of
pyproject.toml's [tool.ruff] (pycodestyle, pyflakes, import order, bugbear, pyupgrade; 120
columns), over the library, tests, benchmarks, experiments, docs/conf.py and the notebooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("ruff", reason="the linter is in the test extra")


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
