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


TINY_LM = {
    "data": {"name": "pydoc"},
    "model": {"d_model": 32, "num_heads": 4, "d_ff": 64},
    "train": {"batch_size": 8, "seq_len": 16, "num_steps": 4, "pretrain_steps": 2, "log_every": 2,
              "eval_every": 4, "checkpoint_every": 2, "keep_checkpoints": 10},
    "forward": {"max_steps": 4, "random_lower": 0},
    "backward": {"max_steps": 4},
    "eval": {"batch_size": 64, "max_steps": 6, "budgets": "1,2,4", "jac_probes": 1},
}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny finished DEQ-Transformer run with checkpoints at steps 2 and 4 (JR on)."""
    from deq_jax.train import train

    run = tmp_path_factory.mktemp("lm") / "run"
    train(TINY_LM, run, progress=False)
    return run


def test_convergence_script_on_a_trained_run(tmp_path, lm_run):
    from experiments.reproduce import convergence

    (result,) = convergence.run(str(tmp_path / "out"), [lm_run], steps=8)
    assert result["checkpoint_step"] == 4 and result["examples"] == 64
    # The forward solve starts from z0 = 0, where ||f(0) - 0|| / ||f(0)|| is exactly 1.
    assert result["forward"][0] == pytest.approx(1.0, rel=1e-5)
    assert result["forward"].shape == result["backward"].shape == (9,)
    assert result["forward"][-1] < 0.1 * result["forward"][0]
    assert 0 < result["backward"][-1] < result["backward"][0]
    for name in ("results.md", "forward.png", "backward.png"):
        assert (tmp_path / "out" / name).exists()


def test_measured_jacobian_matches_the_exact_one(lm_run):
    """Spectral radius (power method) and ||J||_F^2/d (Hutchinson) of the checkpoint against
    the exact Jacobian of one example's cell at the measured fixed point."""
    import deq_jax
    from deq_jax.train import checkpoint, objective
    from deq_jax.train.sampling import open_run
    from experiments.reproduce import measure

    c, task, template = open_run(lm_run)
    params, _ = checkpoint.restore_params(lm_run, template, 4)
    fn = measure.make_measure(task, c, 30, jacobian=True, probes=64, power_iters=200)
    m = measure.measure(fn, params, task, max_examples=2)
    assert m["forward"].shape == (31, 2) and m["frobenius"].shape == m["spectral_radius"].shape == (2,)
    assert m["forward"][-1, 0] < 1e-4  # converged: the first example's z is its fixed point

    inputs = np.asarray(next(task.eval_sets[task.eval_split]())[0])[:1]
    variables = {"params": params}
    x = task.model.apply(variables, inputs, None, method="inject")
    solver = deq_jax.SolverConfig(c.forward.solver, 30, measure.NEVER, c.forward.stop_mode)
    z = objective.forward(task.model, params, inputs, mode="deq", config=solver).z
    f = objective.cell_fn(task.model)
    jac = jax.jacfwd(lambda v: f(params, x, v.reshape(z.shape)).reshape(-1))(z.reshape(-1))
    eigs = np.linalg.eigvals(np.asarray(jac, np.float64))
    assert m["spectral_radius"][0] == pytest.approx(np.abs(eigs).max(), rel=0.05)
    assert m["frobenius"][0] == pytest.approx(float(jnp.sum(jac**2)) / jac.shape[0], rel=0.15)


def test_conditioning_script_measures_every_checkpoint(tmp_path, lm_run):
    from experiments.reproduce import conditioning

    (r,) = conditioning.run(str(tmp_path), [lm_run], budget=4, examples=8, power_iters=20)
    assert r["steps"] == [2, 4] and r["examples"] == 8 and r["label"] == "JR γ = 1"
    for key in conditioning.CURVES:
        assert len(r[key]) == 2 and all(np.isfinite(r[key])) and min(r[key]) > 0
    assert all(a <= b for a, b in zip(r["spectral_radius"], r["spectral_radius_max"], strict=True))
    table = (tmp_path / "results.md").read_text()
    assert table.count("| JR γ = 1 | 2 |") == 1 and table.count("| JR γ = 1 | 4 |") == 1
    for name in ("backward.png", "residual_vs_jacobian.png", "jacobian.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_budgets_and_schedules_scripts_read_finished_runs(tmp_path, lm_run):
    from experiments.reproduce import budgets, schedules

    summary = json.loads((lm_run / "summary.json").read_text())
    (b,) = budgets.run(str(tmp_path / "b"), [lm_run])
    assert b["budgets"] == [1, 2, 4] and b["metric"] == "bpc"
    assert b["quality"] == [summary["budgets"][k]["bpc"] for k in ("1", "2", "4")]
    assert "| JR γ = 1 |" in (tmp_path / "b" / "results.md").read_text()
    (s,) = schedules.run(str(tmp_path / "s"), [lm_run])
    # The first row is pretraining, whose JR weight is jr.pretrain_gamma (0).
    assert s["train_steps"] == [2, 4] and s["gamma"] == [0.0, 1.0] and s["final"] == summary["valid_bpc"]
    for path in ("b/quality.png", "b/residual.png", "s/gamma.png", "s/train_residual.png"):
        assert (tmp_path / path).stat().st_size > 10_000


@pytest.mark.parametrize("size", ["small", "large"])
def test_scripts_default_runs_are_valid_configs(size):
    from deq_jax.train import resolve
    from experiments.reproduce import budgets, conditioning, runs, schedules

    labels = {}
    for made in (conditioning.configs(size, 0.5, 1.0), conditioning.configs(size, 0.5, 1.0, "pydoc"),
                 budgets.configs(size, (0.0, 4.0)), schedules.configs(size, 0.5, 3e-2)):
        for name, overrides in made.items():
            labels[name] = runs.label(resolve(overrides))
    assert labels == {
        "no_reg": "no reg.", "weight_decay": "weight decay 0.5", "jr": "JR γ = 1",
        "gamma_0": "no reg.", "gamma_4": "JR γ = 4",
        "constant": "JR γ = 0.5", "staircase": "JR staircase (γ0 = 0.5)", "adaptive": "JR adaptive (γ0 = 0.5)",
    }
    stair = resolve(schedules.configs(size, 0.5, 3e-2)["staircase"])
    # The DEQ phase is five stairs long.
    assert (stair.train.num_steps - stair.train.pretrain_steps) // stair.jr.staircase_every == 5


def test_train_runs_reuses_finished_runs(tmp_path, lm_run, monkeypatch):
    import shutil

    from experiments.reproduce import runs

    shutil.copytree(lm_run, tmp_path / "done")
    monkeypatch.setattr("deq_jax.train.train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert runs.train_runs(tmp_path, {"done": TINY_LM}) == [tmp_path / "done"]
