"""The notebooks run top to bottom, and the documentation site (docs/: the guides, the
results, the API reference from the docstrings, the notebooks with the outputs of that one
run) builds with warnings as errors, so a broken docstring, a dead cross-reference or a
failing notebook cell fails the suite. One file: the site renders the notebooks this file
has just executed instead of running them a second time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    """The folder where each notebook, once executed here, is kept for the site."""
    return tmp_path_factory.mktemp("executed_notebooks")


def test_there_are_notebooks_and_the_site_lists_each():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]
    for path in NOTEBOOKS:
        page = DOCS / "examples" / path.name
        assert page.resolve() == path.resolve(), f"docs/examples/{path.name} must link to notebooks/{path.name}"
        assert f"examples/{path.stem}" in (DOCS / "index.md").read_text(), path.stem


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch, executed):
    monkeypatch.setenv("DEQ_JAX_QUICK", "1")  # the kernel inherits the environment: small sizes
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    nbformat.write(nb, executed / path.name)


def _stage(executed: Path, stage: Path) -> Path:
    """A copy of docs/ whose examples/ are the notebooks as this run executed them (as stored
    where a notebook did not run here). A copy, not links: MyST resolves a page's links from
    its file's real path. The package and CHANGELOG.md beside it, as in the repository."""
    site = stage / "docs"
    shutil.copytree(DOCS, site, ignore=shutil.ignore_patterns("_build", "runs", "examples"))
    (stage / "CHANGELOG.md").symlink_to(ROOT / "CHANGELOG.md")  # docs/changelog.md includes ../CHANGELOG.md
    (stage / "deq_jax").symlink_to(ROOT / "deq_jax")  # conf.py documents the deq_jax beside docs/
    (site / "examples").mkdir()
    for path in NOTEBOOKS:
        done = executed / path.name
        shutil.copyfile(done if done.exists() else path, site / "examples" / path.name)
    return site


def test_the_site_builds_without_warnings(executed, tmp_path):
    site = _stage(executed, tmp_path / "stage")
    out = tmp_path / "html"  # a fresh folder: an incremental build would not re-read (or warn)
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(site), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:] + proc.stdout[-2000:]

    pages = {str(p.relative_to(out)) for p in out.rglob("*.html")}
    sources = {str(p.relative_to(DOCS).with_suffix(".html")) for p in DOCS.rglob("*")
               if p.suffix in (".md", ".rst", ".ipynb") and p.parts[len(DOCS.parts)] not in ("results", "_build")}
    assert sources <= pages, sorted(sources - pages)  # every page of docs/ was built
    assert {"index.html", "getting_started.html", "results.html", "reliability.html", "performance.html",
            "development.html", "changelog.html", "api/deq_jax.html", "guides/solvers.html"} <= pages

    flat = (out / "api" / "deq_jax.html").read_text()
    for name in ("fixed_point", "SolverConfig", "Phantom", "BackwardStats", "adjoint_solve", "unrolled",
                 "hutchinson_frobenius", "exact_frobenius", "spectral_radius", "SolverResult"):
        assert name in flat, name
    assert 'id="deq_jax.solvers.broyden"' in (out / "api" / "solvers.html").read_text()
    assert 'id="deq_jax.models.MDEQ"' in (out / "api" / "models.html").read_text()
    assert "Unreleased" in (out / "changelog.html").read_text()  # the include found CHANGELOG.md

    for path in NOTEBOOKS:  # rendered with this run's outputs where the notebook ran above
        html = (out / "examples" / f"{path.stem}.html").read_text()
        if (executed / path.name).exists():
            assert re.search(r'<img[^>]+src="[^"]*_images/', html), f"{path.stem}: no figure on its page"
