"""Training: config errors, schedules, the train step, JR, resume after SIGKILL, devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deq_jax import data
from deq_jax.models import MDEQ
from deq_jax.train import checkpoint, objective, schedules
from deq_jax.train import config as config_lib
from deq_jax.train import loop as loop_lib
from deq_jax.train import metrics as metrics_lib
from deq_jax.train import step as step_lib
from deq_jax.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
TIMING = set(loop_lib.TIMING_KEYS)  # differ between runs of the same computation


def small_config(**overrides):
    """A few-second digits run."""
    c = {
        "train": {"batch_size": 16, "num_steps": 12, "pretrain_steps": 4, "pretrain_layers": 2, "log_every": 2,
                  "eval_every": 6, "checkpoint_every": 4, "keep_checkpoints": 2},
        "forward": {"max_steps": 5, "random_lower": 1},
        "backward": {"max_steps": 5},
        "jr": {"prob": 0.5},
        "eval": {"batch_size": 120, "max_steps": 8, "budgets": "1,3,5", "jac_probes": 1, "spectral_iters": 5},
        "model": {"dropout": 0.2},
    }
    for group, values in overrides.items():
        c.setdefault(group, {}).update(values)
    return c


def build(c, mode="deq", devices=None, jr=False):
    c = config_lib.resolve(c)
    mesh = step_lib.make_mesh(devices)
    model = MDEQ(c.model.size, dropout=c.model.dropout)
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(model, c, tx, np.zeros((1, 8, 8, 1), np.float32), mesh)
    return c, model, state, step_lib.make_train_step(model, c, tx, lr, mesh, mode, jr=jr)


def fixed_batch(n=16):
    ds = data.load_digits()
    images, labels = data.train_batch(ds, 0, n, seed=0)
    return jnp.asarray(images), jnp.asarray(labels)


# --- config -----------------------------------------------------------------------


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown config key 'jr.gama'.*did you mean 'jr.gamma'"):
        config_lib.resolve({"jr": {"gama": 1.0}})
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        config_lib.resolve(ml_collections.ConfigDict({"optimizer": {"name": "adam"}}))
    with pytest.raises(ValueError, match="multiple of train.log_every"):
        config_lib.resolve({"train": {"log_every": 3, "checkpoint_every": 10}})
    with pytest.raises(ValueError, match="jr.schedule"):
        config_lib.resolve({"jr": {"schedule": "cosine"}})
    resolved = config_lib.resolve({"jr": {"gamma": 2.0}})
    assert resolved.jr.gamma == 2.0 and resolved.forward.solver == "broyden"
    with pytest.raises(AttributeError):
        resolved.jr.new_key = 1  # locked


def test_solver_precision_comes_from_the_config():
    """``forward.precision`` / ``backward.precision`` reach the solvers (training, eval);
    unset they keep the platform default, and an unknown value is a clear error."""
    default = objective.solvers_from_config(config_lib.resolve({}))
    assert default.forward.precision is None and default.backward.precision is None
    c = config_lib.resolve({"forward": {"precision": "highest"}, "backward": {"precision": "high"}})
    chosen = objective.solvers_from_config(c)
    assert (chosen.forward.precision, chosen.eval_forward.precision, chosen.backward.precision) == (
        "highest", "highest", "high",
    )
    with pytest.raises(ValueError, match="forward.precision must be one of"):
        config_lib.resolve({"forward": {"precision": "fp32"}})


def test_early_exit_comes_from_the_config():
    """``forward.early_exit`` / ``backward.early_exit`` reach the training solves (False: a
    solve runs all its steps); evaluation solves always exit early."""
    import jax.numpy as jnp

    default = objective.solvers_from_config(config_lib.resolve({}))
    assert dict(default.forward.options)["early_exit"] and dict(default.backward.options)["early_exit"]
    c = config_lib.resolve({"forward": {"early_exit": False, "max_steps": 7}, "backward": {"early_exit": False}})
    fixed = objective.solvers_from_config(c)
    assert not dict(fixed.backward.options)["early_exit"] and "early_exit" not in dict(fixed.eval_forward.options)
    result = fixed.forward.solve(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 3)))  # converges in a few steps
    assert bool(result.converged.all()) and int(result.f_evals) == 8
    with pytest.raises(TypeError, match="early_exit"):  # ml_collections keeps the key a bool
        config_lib.resolve({"forward": {"early_exit": "no"}})


def test_compute_dtype_comes_from_the_config():
    """``model.compute_dtype`` reaches the model's DEQ layer (float32: no casts at all)."""
    from deq_jax.train import tasks

    assert tasks.make_task(config_lib.resolve({})).model.compute_dtype is None
    c = config_lib.resolve({"model": {"compute_dtype": "bfloat16"}})
    assert tasks.make_task(c).model.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="model.compute_dtype must be one of"):
        config_lib.resolve({"model": {"compute_dtype": "bf16"}})


def test_staircase_schedule_follows_its_rule():
    sched = schedules.staircase(0.5, delta=0.1, every=10, pretrain_steps=20)
    state, gammas = sched.init(), []
    for t in range(50):
        gammas.append(float(state.gamma))
        state = sched.update(state, step=jnp.int32(t), fwd_steps=1.0, fwd_residual=0.0, in_deq=t >= 20)
    expected = [0.5 + 0.1 * (max(t - 20, 0) // 10) for t in range(50)]
    np.testing.assert_allclose(gammas, expected, rtol=1e-6)


def test_adaptive_schedule_raises_lowers_clips_and_waits_for_deq_mode():
    sched = schedules.adaptive(1.0, target_steps=6.0, target_residual=1e-3, slack=0.25, up=1.5, down=0.5,
                               ema=0.0, gamma_min=0.2, gamma_max=3.0)
    s = sched.init()
    update = jax.jit(sched.update)
    s_pre = update(s, step=0, fwd_steps=20.0, fwd_residual=1.0, in_deq=False)
    assert float(s_pre.gamma) == 1.0  # pretraining: no solver, no change
    s1 = update(s, step=0, fwd_steps=9.0, fwd_residual=1e-4, in_deq=True)  # too many steps
    assert float(s1.gamma) == pytest.approx(1.5)
    s2 = update(s, step=0, fwd_steps=5.0, fwd_residual=1e-2, in_deq=True)  # residual too high
    assert float(s2.gamma) == pytest.approx(1.5)
    s3 = update(s, step=0, fwd_steps=5.0, fwd_residual=1e-4, in_deq=True)  # within the slack band
    assert float(s3.gamma) == pytest.approx(1.0)
    s4 = update(s, step=0, fwd_steps=3.0, fwd_residual=1e-4, in_deq=True)  # comfortably under
    assert float(s4.gamma) == pytest.approx(0.5)
    for _ in range(10):
        s1 = update(s1, step=0, fwd_steps=9.0, fwd_residual=1e-4, in_deq=True)
        s4 = update(s4, step=0, fwd_steps=3.0, fwd_residual=1e-4, in_deq=True)
    assert float(s1.gamma) == pytest.approx(3.0) and float(s4.gamma) == pytest.approx(0.2)
    # With smoothing, one fast step after many slow ones does not lower gamma.
    smooth = schedules.adaptive(1.0, target_steps=6.0, target_residual=1e-3, slack=0.25, up=1.1, down=0.5,
                                ema=0.9, gamma_min=0.2, gamma_max=30.0)
    s = smooth.init()
    for _ in range(20):
        s = smooth.update(s, step=0, fwd_steps=9.0, fwd_residual=1e-4, in_deq=True)
    before = float(s.gamma)
    s = smooth.update(s, step=0, fwd_steps=1.0, fwd_residual=1e-4, in_deq=True)
    assert float(s.ema_steps) > 6.0 and float(s.gamma) > before


def test_adaptive_schedule_ignores_non_finite_measurements():
    """One NaN measurement must not enter the moving averages (it would stay there and let
    gamma only rise); the next finite one updates as usual."""
    sched = schedules.adaptive(1.0, target_steps=6.0, target_residual=1e-3, slack=0.25, up=1.5, down=0.5,
                               ema=0.9, gamma_min=0.2, gamma_max=3.0)
    update = jax.jit(sched.update)
    s = sched.init()
    for bad in ({"fwd_steps": 3.0, "fwd_residual": float("nan")}, {"fwd_steps": float("inf"), "fwd_residual": 1e-4}):
        after = update(s, step=0, in_deq=True, **bad)
        chex.assert_trees_all_equal(after, s)
    s = update(s, step=0, fwd_steps=3.0, fwd_residual=float("nan"), in_deq=True)
    for _ in range(30):
        s = update(s, step=0, fwd_steps=3.0, fwd_residual=1e-4, in_deq=True)
    assert np.isfinite(float(s.ema_residual)) and float(s.gamma) < 1.0  # comfortably fast: gamma fell


# --- the train step -----------------------------------------------------------------


def test_train_step_decreases_the_loss_and_never_retraces():
    c, _, state, train_step = build(small_config(forward={"random_lower": 0}, model={"dropout": 0.0},
                                                 optim={"learning_rate": 1e-2, "warmup_steps": 0}))
    images, labels = fixed_batch()
    losses = []
    for _ in range(4):
        state, metrics = train_step(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert losses[1] < losses[0] and losses[-1] < losses[0], losses
    assert train_step._cache_size() == 1  # one compilation for all steps
    assert int(state.step) == 4
    for key in ("fwd_steps", "fwd_residual", "bwd_steps", "bwd_residual"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["step_limit"]) == 5.0  # random_lower=0: the configured limit, unlowered


def test_jr_term_is_present_exactly_when_it_should_be():
    """JR enters the update exactly when the mode's weight is > 0 and the step's coin says
    so. While pretraining the weight is ``jr.pretrain_gamma`` (default 0, as in the official
    code), never ``jr.gamma``; the unrolled step compiles fastest. SGD without warm-up, so
    the first update is proportional to the gradient."""
    images, labels = fixed_batch()
    params = {}
    cases = [(1.0, 2.0, 0.0, False), (1.0, 0.0, 2.0, True), (0.0, 0.0, 2.0, False), (1.0, 0.0, 0.0, False)]
    for prob, gamma, pretrain_gamma, applied in cases:
        c = small_config(jr={"prob": prob, "gamma": gamma, "pretrain_gamma": pretrain_gamma},
                         optim={"name": "sgd", "warmup_steps": 0})
        assert step_lib.jr_coin(config_lib.resolve(c), 0, "unrolled") == applied
        _, _, state, train_step = build(c, mode="unrolled", jr=applied)
        new_state, metrics = train_step(state, images, labels)
        assert float(metrics["jr_applied"]) == float(applied)
        assert np.isfinite(float(metrics["jr"])) == applied
        assert float(metrics["gamma"]) == pretrain_gamma
        params[prob, gamma, pretrain_gamma] = new_state.params
    # Not applied (gamma only, the coin says no, or no weight): the same update; applied: another.
    chex.assert_trees_all_close(params[1.0, 2.0, 0.0], params[0.0, 0.0, 2.0], params[1.0, 0.0, 0.0])
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params[1.0, 0.0, 2.0]["deq"]["cell"]["fuse"],
                        params[1.0, 0.0, 0.0]["deq"]["cell"]["fuse"])
    assert max(jax.tree.leaves(diff)) > 0
    with pytest.raises(ValueError, match="gives JR no weight"):
        build(small_config(jr={"gamma": 2.0}), mode="unrolled", jr=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's convolution layouts")
def test_the_compiled_jr_step_has_no_conditional_and_only_fast_convolutions():
    """The JR coin is flipped on the host: neither compiled DEQ step holds a conditional (a
    cond costs a device-to-host copy of its predicate per step on a GPU), and every
    convolution of the JR step (the JR term and its double backward) is in the layout XLA's
    CPU backend runs fast (its layout pass skips a cond's branches: with the old per-step
    cond the digits step took 2.3x as long)."""
    for jr in (False, True):
        c, _, state, train_step = build(small_config(), mode="deq", jr=jr)
        images, labels = fixed_batch()
        hlo = train_step.lower(state, images, labels).compile().as_text()
        assert "conditional(" not in hlo, jr
        labels_found = set(re.findall(r"dim_labels=([\w>-]+)", hlo))
        assert labels_found == {"b01f_01io->b01f"}, (jr, labels_found)


def _randomness(steps=range(400), **overrides):
    c = config_lib.resolve(small_config(**overrides))
    coins = np.array([step_lib.jr_coin(c, t, "deq") for t in steps])
    limits = [int(step_lib.step_randomness(c.seed, jnp.int32(t), 16, c, coin)[0]) for t, coin in zip(steps, coins)]
    return coins, np.array(limits)


def test_jr_coin_follows_its_probability_and_stops_at_stop_step():
    coins, _ = _randomness(jr={"prob": 0.5})
    assert 0.4 < coins.mean() < 0.6
    coins, _ = _randomness(jr={"prob": 0.5, "stop_step": 100})
    assert coins[:100].any() and not coins[100:].any()
    coins, _ = _randomness(jr={"prob": 0.1})
    assert 0.05 < coins.mean() < 0.15
    assert _randomness(jr={"prob": 1.0})[0].all() and not _randomness(jr={"prob": 0.0})[0].any()


def test_jr_coins_depend_on_the_seed_and_step_alone():
    """A resumed run draws the coins an uninterrupted one drew: each is a function of
    (seed, step), whatever was drawn before it, in this process or another."""
    c = config_lib.resolve(small_config(jr={"prob": 0.5}))
    forward = [step_lib.jr_coin(c, t, "deq") for t in range(200)]
    backward = [step_lib.jr_coin(c, t, "deq") for t in reversed(range(200))][::-1]
    assert forward == backward
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from test_train import small_config; "
            "from deq_jax.train import config, step; c = config.resolve(small_config(jr={'prob': 0.5})); "
            "print(json.dumps([step.jr_coin(c, t, 'deq') for t in range(200)]))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == forward
    other_seed = config_lib.resolve(small_config(jr={"prob": 0.5}) | {"seed": 1})
    assert [step_lib.jr_coin(other_seed, t, "deq") for t in range(200)] != forward


def test_random_step_limit_rules():
    """DEQ-Sequence rule: limit - U{0..2} on every step. MDEQ rule: limit + U{-2..+1} on
    JR steps only, the configured limit otherwise (locuslab/deq, cls_function.py)."""
    coins, limits = _randomness(forward={"max_steps": 5, "random_lower": 2, "random_lower_rule": "every_step"})
    assert set(limits) == {3, 4, 5}
    assert set(limits[~coins]) == {3, 4, 5}  # also on steps without JR
    coins, limits = _randomness(forward={"max_steps": 5, "random_lower": 2, "random_lower_rule": "jr_steps"})
    assert set(limits[~coins]) == {5}
    assert set(limits[coins]) == {3, 4, 5, 6}
    counts = np.bincount(limits[coins] - 3)
    assert counts.min() > 0.15 * coins.sum()  # roughly uniform over the four values
    # No JR weight: no JR steps, so the MDEQ rule never changes the limit.
    c = config_lib.resolve(small_config(jr={"gamma": 0.0}, forward={"random_lower_rule": "jr_steps"}))
    assert not any(step_lib.jr_coin(c, t, "deq") for t in range(50))


def test_mdeq_rule_raises_the_limit_without_recompiling():
    """The +1 of the MDEQ rule needs one step of headroom in the static solver limit."""
    c, _, state, train_step = build(small_config(forward={"random_lower": 1, "random_lower_rule": "jr_steps"},
                                                 jr={"prob": 1.0}, backward={"mode": "phantom"}), jr=True)
    images, labels = fixed_batch()
    seen = set()
    for _ in range(6):
        state, metrics = train_step(state, images, labels)
        seen.add(float(metrics["step_limit"]))
        assert float(metrics["fwd_nfe"]) <= float(metrics["step_limit"]) + 1
    assert seen <= {4.0, 5.0, 6.0} and 6.0 in seen, seen
    assert train_step._cache_size() == 1


def test_top_k_hits_against_a_sort():
    logits = jax.random.normal(jax.random.key(0), (64, 10))
    labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    order = np.argsort(-np.asarray(logits), axis=1)  # no ties in random normals
    for k in (1, 5):
        expected = (order[:, :k] == np.asarray(labels)[:, None]).any(axis=1)
        np.testing.assert_array_equal(objective.top_k_hits(logits, labels, k), expected)


def test_jr_gradient_reaches_the_cell_parameters():
    model = MDEQ("digits")
    images, _ = fixed_batch(4)
    params = model.init(jax.random.key(0), images, unroll=1)["params"]
    x = model.apply({"params": params}, images, method="inject")
    z = model.apply({"params": params}, x, model.apply({"params": params}, x, method="initial_state"), method="cell")
    keys = jax.random.split(jax.random.key(1), 4)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(objective.jacobian_penalty(model, p, x, z, keys, 1))))(params)
    parts = {**grads["deq"]["cell"], **{k: v for k, v in grads.items() if k != "deq"}}
    norms = {name: float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(sub)))) for name, sub in parts.items()}
    for cell_part in ("blocks_0", "blocks_1", "fuse"):
        assert norms[cell_part] > 0, norms
    for outside in ("head_final", "classifier"):
        assert norms[outside] == 0, norms


# --- non-finite steps ---------------------------------------------------------------


def test_a_nan_example_skips_the_step_and_changes_nothing():
    """One NaN pixel in one example: the forward solve flags that example and returns z0
    for it, so the loss stays finite while every gradient is NaN. The step must leave
    parameters and optimizer state as they were and say it was skipped."""
    c, _, state, train_step = build(small_config(), mode="deq")
    images, labels = fixed_batch()
    before = jax.device_get(state)
    new_state, metrics = train_step(state, images.at[3, 2, 2, 0].set(jnp.nan), labels)
    assert np.isfinite(float(metrics["loss"]))  # the loss alone would not show it
    assert float(metrics["skipped"]) == 1.0 and float(metrics["fwd_nonfinite"]) >= 1.0
    chex.assert_trees_all_equal(jax.device_get(new_state.params), before.params)
    chex.assert_trees_all_equal(jax.device_get(new_state.opt_state), before.opt_state)
    assert int(new_state.step) == 1  # the step (and its batch) is consumed
    _, metrics = train_step(new_state, images, labels)
    assert float(metrics["skipped"]) == 0.0 and float(metrics["fwd_nonfinite"]) == 0.0


def _poisoned(monkeypatch, steps):
    """Training batches of the given global steps get a NaN pixel in their first image."""
    import dataclasses

    from deq_jax.train import loop

    real = loop.make_task

    def make_task(c):
        task = real(c)

        def train_batch(step, rows=None):
            images, labels = task.train_batch(step, rows)
            if step in steps:
                images = images.copy()
                images[0, 0, 0, 0] = np.nan
            return images, labels

        return dataclasses.replace(task, train_batch=train_batch)

    monkeypatch.setattr(loop, "make_task", make_task)


def _checkpoints_are_finite(run):
    import orbax.checkpoint as ocp

    steps = checkpoint.steps(run)
    assert steps
    for step in steps:  # every array as saved, read without a template
        path = run / checkpoint.ORBAX_DIR / str(step) / "default"
        for leaf in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path)):
            assert np.all(np.isfinite(np.asarray(leaf, np.float64))), path


def test_a_run_with_a_nan_batch_finishes_with_finite_checkpoints(tmp_path, monkeypatch):
    from deq_jax.train import train

    _poisoned(monkeypatch, {6})
    # The resume test's config (implicit backward, 24 steps): the compiled steps are shared
    # through the persistent compilation cache.
    c = small_config(train={"num_steps": 24, "keep_checkpoints": 10})
    summary = train(c, tmp_path / "run", progress=False)
    assert summary["steps"] == 24
    rows = [r for r in metrics_lib.read(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(r["skipped_steps"] for r in rows) == 1
    assert [r["step"] for r in rows if r["skipped_steps"]] == [8]  # step 6 lies in the interval ending at 8
    assert next(r for r in rows if r["step"] == 8)["fwd_nonfinite_examples"] >= 1
    _checkpoints_are_finite(tmp_path / "run")


def test_consecutive_nan_steps_stop_the_run_with_finite_checkpoints(tmp_path, monkeypatch):
    from deq_jax.train import train

    _poisoned(monkeypatch, set(range(5, 12)))
    c = small_config(train={"num_steps": 24, "max_skipped_steps": 3})
    with pytest.raises(FloatingPointError, match=r"3 consecutive training steps \(5 to 7\).*NaN/Inf in the inputs"):
        train(c, tmp_path / "run", progress=False)
    _checkpoints_are_finite(tmp_path / "run")
    assert checkpoint.steps(tmp_path / "run") == [4]


# --- devices ------------------------------------------------------------------------

MULTIDEVICE = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"  # 4 simulated devices, also on a machine with a GPU
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {tests!r})
from test_train import build, fixed_batch, small_config
from deq_jax.train import step as step_lib
assert jax.device_count() == 4
# The default implicit backward with its statistics probe, JR on every step, and plain SGD
# without warm-up or clipping at a learning rate that moves the parameters by >= 1e-2: a
# psum where a pmean belongs (or a per-device loss scale) would show (Adam would hide it).
c = small_config(jr={{"prob": 1.0}}, optim={{"name": "sgd", "learning_rate": 0.5, "warmup_steps": 0, "clip_norm": 0.0,
                                           "momentum": 0.0}})
images, labels = fixed_batch(16)
results = {{}}
for n in (1, 4):
    _, _, state, train_step = build(c, mode="deq", devices=jax.devices()[:n], jr=True)
    start = jax.device_get(state.params)
    for _ in range(2):
        state, metrics = train_step(state, images, labels)
    results[n] = (jax.device_get(state.params), jax.device_get(metrics))
(p1, m1), (p4, m4) = results[1], results[4]
moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(start), strict=True))
assert moved >= 1e-2, moved
for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
assert np.isfinite(m1["bwd_residual"]) and m1["bwd_steps"] > 0
for k in m1:
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-3, atol=1e-5, err_msg=k)
# Evaluation: Jacobian probes and power-method starts follow each example's index in the
# evaluation set, so 1 and 4 devices report the same norms.
sums = {{}}
for n in (1, 4):
    cc, model, _, _ = build(c, mode="deq", devices=jax.devices()[:n])
    eval_step = step_lib.make_eval_step(model, cc, step_lib.make_mesh(jax.devices()[:n]), with_jacobian=True)
    sums[n], _ = jax.device_get(eval_step(p1, np.int32(5), images, labels, np.ones(16, np.float32), np.int32(32),
                                          None))
for k in ("jac", "spectral", "loss", "residual"):
    np.testing.assert_allclose(sums[1][k], sums[4][k], rtol=1e-4, err_msg=k)
assert sums[1]["spectral"] > 0
try:
    step_lib.check_batch(10, step_lib.make_mesh())
except ValueError as e:
    assert "not divisible by the 4 devices" in str(e), e
else:
    raise AssertionError("batch 10 on 4 devices did not fail")
print("OK")
"""


def test_data_parallel_on_4_cpu_devices_matches_one_device():
    code = MULTIDEVICE.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# --- resume -------------------------------------------------------------------------


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_sigkilled_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    from deq_jax.train import train

    # The default implicit backward (adjoint solve and its statistics probe).
    c = small_config(train={"num_steps": 24})
    reference = train(c, tmp_path / "reference", progress=False)
    assert reference["steps"] == 24 and (tmp_path / "reference" / "plots" / "training.png").exists()

    # Same run in a subprocess, killed with SIGKILL once a checkpoint exists.
    run = tmp_path / "killed"
    script = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from deq_jax.train import train; "
        "train(json.loads(sys.argv[1]), sys.argv[2], progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(c), str(run)], cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not checkpoint.steps(run):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.steps(run)[-1]
    assert killed_at < 24

    with pytest.raises(FileExistsError, match="--resume"):
        train(c, run, progress=False)
    resumed = train(c, run, resume=True, progress=False)
    assert resumed["steps"] == 24
    ref_rows = metrics_lib.read(tmp_path / "reference" / "metrics.jsonl")
    got_rows = metrics_lib.read(run / "metrics.jsonl")
    assert _comparable(got_rows) == _comparable(ref_rows)
    assert checkpoint.steps(run) == [20, 24]  # keep 2

    with pytest.raises(ValueError, match="different config"):
        train(small_config(train={"num_steps": 24}, jr={"gamma": 3.0}), run, resume=True, progress=False)


def test_sigterm_saves_at_the_next_log_boundary_and_prints_the_command_that_resumes(tmp_path):
    """SIGTERM (SLURM, preemptible machines) or Ctrl-C: a checkpoint at the next log boundary,
    one line with the resume command, exit status 128 + signal; resuming gives exactly the
    metrics of an uninterrupted run of the same command (the command line sets XLA's CPU
    flags, so the reference runs through it too)."""
    overrides = small_config(train={"num_steps": 40, "checkpoint_every": 20})
    config = tmp_path / "small.py"
    config.write_text(
        "from deq_jax.train.config import default_config\n\n\ndef get_config():\n    c = default_config()\n"
        f"    for group, values in {overrides!r}.items():\n        c[group].update(values)\n    return c\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(run):
        # An override equal to the file's value: --config.* flags reach the run (they were once parsed twice,
        # which absl refused) and travel into the resume command.
        command = [sys.executable, "-m", "experiments.train", f"--config={config}", "--config.train.num_steps=40",
                   f"--workdir={run}", "--noprogress"]
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    reference, run = tmp_path / "reference", tmp_path / "stopped"
    procs = [start(reference), start(run)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and procs[1].poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert procs[1].poll() is None, procs[1].communicate()[0][-3000:]
        procs[1].send_signal(signal.SIGTERM)
        ref_out, out = (p.communicate(timeout=300)[0] for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 0, ref_out[-3000:]
    assert procs[1].returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = checkpoint.steps(run)[-1]
    assert stopped < 40 and stopped % 2 == 0, stopped  # a log boundary (log_every 2), before the end
    match = re.search(rf"SIGTERM: stopped after step {stopped}, its checkpoint written; resume with:\n  (.+)\n", out)
    assert match, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    resume = match.group(1).split()
    assert resume[:3] == ["python3", "-m", "experiments.train"] and resume[-2:] == [f"--workdir={run}", "--resume"]
    assert "--config.train.num_steps=40" in resume
    done = subprocess.run([sys.executable] + resume[1:], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert _comparable(metrics_lib.read(run / "metrics.jsonl")) == _comparable(
        metrics_lib.read(reference / "metrics.jsonl"))
