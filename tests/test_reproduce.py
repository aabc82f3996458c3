"""Reproduction scripts at tiny sizes: they run, write their tables and figures, and
report quantities that match an independent computation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reproduce import synthetic


def test_synthetic_cell_has_200_parameters_and_exact_jacobian():
    params = synthetic.init_params(jax.random.key(0))
    assert sum(p.size for p in jax.tree.leaves(params)) == 200
    x = jnp.linspace(-2, 2, 7)[:, None]
    z = jnp.linspace(-1, 1, 7)[:, None]
    eps = 1e-3
    fd = (synthetic.cell(params, x, z + eps) - synthetic.cell(params, x, z - eps))[:, 0] / (2 * eps)
    np.testing.assert_allclose(synthetic.df_dz(params, x, z), fd, rtol=1e-2, atol=1e-3)


def test_synthetic_script_writes_its_table_and_figures(tmp_path):
    results = synthetic.run(str(tmp_path), gammas=(0.0, 4.0), steps=40, n=64)
    assert set(results) == {0.0, 4.0}
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| 0 |") == 1 and table.count("\n| 4 |") == 1
    assert (tmp_path / "fit.png").stat().st_size > 10_000 and (tmp_path / "steps.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    for r in saved.values():
        assert 0 <= r["test_mse"] < 10 and 1 <= r["steps_to_tol"] <= synthetic.EVAL_STEPS
        assert 0 <= r["reached_tol"] <= 1 and np.isfinite(r["jac_sq"])
    assert saved["0.0"]["test_mse"] == pytest.approx(results[0.0]["test_mse"], rel=1e-12)
