"""The API reference (docs/api) builds from the docstrings with warnings as errors, so a
broken docstring (bad reST, a malformed Args: section, a module that fails to import) fails
the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sphinx", reason="the docs build needs sphinx (the test extra)")


def test_the_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "html"  # a fresh folder: an incremental build would not re-read (or warn)
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs" / "api"), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:] + proc.stdout[-2000:]
    pages = {p.name for p in out.glob("*.html")}
    assert {"index.html", "deq_jax.html", "solvers.html", "jacobian.html", "models.html", "data.html",
            "train.html"} <= pages, pages
    flat = (out / "deq_jax.html").read_text()
    for name in ("fixed_point", "SolverConfig", "Phantom", "BackwardStats", "adjoint_solve", "unrolled",
                 "hutchinson_frobenius", "exact_frobenius", "spectral_radius", "SolverResult"):
        assert name in flat, name
    assert 'id="deq_jax.solvers.broyden"' in (out / "solvers.html").read_text()
    assert 'id="deq_jax.models.MDEQ"' in (out / "models.html").read_text()
