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


def test_convergence_script_on_a_trained_run(tmp_path):
    from experiments.reproduce import convergence
    from deq_jax.train import train

    c = {
        "data": {"name": "pydoc"},
        "model": {"d_model": 32, "num_heads": 4, "d_ff": 64},
        "train": {"batch_size": 8, "seq_len": 16, "num_steps": 4, "pretrain_steps": 2, "log_every": 2,
                  "eval_every": 4, "checkpoint_every": 2},
        "forward": {"max_steps": 4, "random_lower": 0},
        "backward": {"max_steps": 4},
        "eval": {"batch_size": 64, "max_steps": 6, "budgets": "2", "jac_probes": 1},
    }
    train(c, tmp_path / "run", progress=False)
    (result,) = convergence.run(str(tmp_path / "out"), [tmp_path / "run"], steps=8)
    assert result["checkpoint_step"] == 4 and result["examples"] == 64
    # The forward solve starts from z0 = 0, where ||f(0) - 0|| / ||f(0)|| is exactly 1.
    assert result["forward"][0] == pytest.approx(1.0, rel=1e-5)
    assert result["forward"].shape == result["backward"].shape == (9,)
    assert result["forward"][-1] < 0.1 * result["forward"][0]
    assert 0 < result["backward"][-1] < result["backward"][0]
    for name in ("results.md", "forward.png", "backward.png"):
        assert (tmp_path / "out" / name).exists()
