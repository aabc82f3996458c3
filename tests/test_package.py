"""The wheel: it ships only deq_jax (with py.typed, the configs and the ``deq-jax-train``
command), and it works installed into a fresh virtual environment, away from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Never copied into the build: outputs of earlier builds (a stale build/lib would end up in
# the wheel), caches, run folders and the docs build.
_NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                      "runs", "_build", ".venv", "venv", "*.whl")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the wheel from a copy of the source tree (without earlier build outputs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp / "dist")])
    (built,) = (tmp / "dist").glob("deq_jax-*.whl")
    return built


def test_the_wheel_ships_only_deq_jax(wheel):
    import deq_jax

    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"deq_jax-{deq_jax.__version__}.dist-info/"
    assert wheel.name.startswith(f"deq_jax-{deq_jax.__version__}-")
    strays = [n for n in names if not (n.startswith("deq_jax/") or n.startswith(dist_info))]
    assert not strays, strays  # no experiments/, tests/, benchmarks/, notebooks/
    assert "deq_jax/py.typed" in names
    configs = {p.name for p in (ROOT / "deq_jax" / "configs").glob("*.py")}
    assert "digits.py" in configs
    assert configs <= {Path(n).name for n in names if n.startswith("deq_jax/configs/")}
    for module in ("deq_jax/solvers/broyden.py", "deq_jax/models/mdeq.py", "deq_jax/linen.py", "deq_jax/nnx.py",
                   "deq_jax/train/cli.py", "deq_jax/train/cpu_flags.py", "deq_jax/data/pipeline.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}entry_points.txt").decode()
    assert "deq-jax-train = deq_jax.train.cli:run" in entry_points


_SMOKE = """
import importlib.util, sys
import deq_jax, deq_jax.solvers, deq_jax.models
assert deq_jax.__file__.startswith(sys.prefix), (deq_jax.__file__, sys.prefix)
import jax, jax.numpy as jnp
f = lambda p, x, z: 0.5 * jnp.tanh(z) + x
x = jnp.ones((1, 3))
z, result = deq_jax.fixed_point(f, None, x, jnp.zeros((1, 3)))
assert bool(result.converged.all()) and float(jnp.abs(f(None, x, z) - z).max()) < 1e-2, result
assert bool(deq_jax.solvers.broyden(lambda z: f(None, x, z), jnp.zeros((1, 3))).converged.all())
jr = deq_jax.hutchinson_frobenius(lambda z: f(None, x, z), z, jax.random.PRNGKey(0))
assert jr.shape == (1,) and bool(jnp.isfinite(jr).all()), jr
assert issubclass(deq_jax.models.MDEQ, __import__("flax").linen.Module)
assert issubclass(deq_jax.linen.DEQ, __import__("flax").linen.Module)
assert issubclass(deq_jax.nnx.DEQ, __import__("flax").nnx.Module)
z, stats = deq_jax.equilibrium(f, None, x, jnp.zeros((1, 3)), jr_keys=jax.random.PRNGKey(0))
assert bool(stats.result.converged.all()) and stats.jr.shape == (1,), stats
assert importlib.util.find_spec("experiments") is None, importlib.util.find_spec("experiments")
print("ok", deq_jax.__version__)
"""


def test_the_wheel_installs_and_runs_in_a_fresh_virtual_environment(wheel, tmp_path):
    """Installed with --no-deps into a new venv whose only view of this environment is its
    third-party packages (a path line in a .pth adds the directory but does not run the .pth
    files in it, so this environment's editable deq_jax and `experiments` stay invisible)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Installed before the .pth exists: pip must not see this environment's deq_jax.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                     .stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (venv_site / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    away = tmp_path / "elsewhere"  # no deq_jax or experiments folder to import from here
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = _run([str(python), "-c", _SMOKE], cwd=away, env=env)
    assert proc.stdout.strip().startswith("ok")

    proc = subprocess.run([str(python), "-c", "import experiments"], cwd=away, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "No module named 'experiments'" in proc.stderr, proc.stderr[-2000:]

    proc = _run([str(venv / "bin" / "deq-jax-train"), "--help"], cwd=away, env=env)
    assert "--config" in proc.stdout and "--workdir" in proc.stdout and "--resume" in proc.stdout, proc.stdout
    default = str(venv_site / "deq_jax" / "configs" / "digits.py")  # the packaged config; absl wraps it
    assert default in "".join(proc.stdout.split()), proc.stdout


def test_xla_flags_set_after_importing_the_library_still_reach_xla(tmp_path):
    """jax reads XLA_FLAGS when its backend starts, not at import: deq_jax.train.cli (and the
    whole library it imports) starts no backend, so cpu_flags.apply() in the command still
    takes effect. Shown with a flag XLA does not know: XLA aborts on it at backend start."""
    probe = ("import os, deq_jax.train.cli, deq_jax.models, deq_jax.data, deq_jax.configs.digits\n"
             "os.environ['XLA_FLAGS'] = '--xla_flag_that_does_not_exist_deq=true'\n"
             "print('imported', flush=True)\n"
             "import jax; jax.devices()\n"
             "print('backend started without reading XLA_FLAGS')\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.startswith("imported"), proc.stderr[-2000:]
    assert proc.returncode != 0 and "xla_flag_that_does_not_exist_deq" in proc.stderr, (proc.stdout, proc.stderr)
