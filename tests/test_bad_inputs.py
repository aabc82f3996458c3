"""Bad input at every public entry point gives an error that names the argument and what
was expected: solvers, the implicit layer, the Jacobian tools, config resolution, data
loaders and the command-line entry points. (Each module's own tests check its main
errors in context; this module is the one list of them.)"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import deq_jax
from deq_jax import data, solvers
from deq_jax.data import text
from deq_jax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
Z0 = jnp.zeros((4, 3))
F = lambda z: 0.5 * z  # noqa: E731


def cell(params, x, z):
    return jnp.tanh(z @ params + x)


PARAMS = 0.1 * jnp.eye(3)
X = jnp.ones((4, 3))
KEY = jax.random.key(0)

CASES = {
    # solvers
    "integer z0": (lambda: solvers.broyden(F, jnp.zeros((4, 3), jnp.int32)), TypeError, "floating-point z0"),
    "scalar z0": (lambda: solvers.anderson(F, jnp.zeros(())), ValueError, "leading batch axis"),
    "max_steps 0": (lambda: solvers.anderson(F, Z0, max_steps=0), ValueError, "max_steps must be >= 1"),
    "float max_steps": (lambda: solvers.broyden(F, Z0, max_steps=2.5), ValueError, "max_steps must be a Python int"),
    "tol 0": (lambda: solvers.fixed_point_iteration(F, Z0, tol=0.0), ValueError, "tol must be a positive number"),
    "stop_mode": (lambda: solvers.broyden(F, Z0, stop_mode="max"), ValueError, "stop_mode must be one of"),
    "causal_axis 0": (lambda: solvers.anderson(F, Z0, causal_axis=0), ValueError, "causal_axis must be None or"),
    "causal_axis too large": (lambda: solvers.broyden(F, Z0, causal_axis=2), ValueError, "causal_axis=2 is not"),
    "memory 0": (lambda: solvers.broyden(F, Z0, memory=0), ValueError, "memory must be a positive int"),
    "mixing 0": (lambda: solvers.anderson(F, Z0, mixing=0.0), ValueError, r"mixing must be in \(0, 1\]"),
    "damping 1": (lambda: solvers.fixed_point_iteration(F, Z0, damping=1.0), ValueError, "damping must be in"),
    "f changes shape": (lambda: solvers.broyden(lambda z: z[:, :2], Z0), ValueError, "same structure and shapes"),
    "unknown solver": (lambda: solvers.get("newton"), ValueError, "unknown solver 'newton'"),
    "precision name": (
        lambda: deq_jax.SolverConfig("broyden", precision="fp32"), ValueError, "precision must be one of"
    ),
    "compute_dtype not a dtype": (lambda: deq_jax.equilibrium(cell, PARAMS, X, Z0, compute_dtype="bf16"), ValueError,
                                  "compute_dtype must be None or one of"),
    "compute_dtype float64": (lambda: deq_jax.equilibrium(cell, PARAMS, X, Z0, compute_dtype="float64"), ValueError,
                              "compute_dtype must be None or one of"),
    # the implicit layer
    "x batch 1": (lambda: deq_jax.fixed_point(cell, PARAMS, X[:1], Z0), ValueError, "z0's batch size 4"),
    "x batch 3": (lambda: deq_jax.fixed_point(cell, PARAMS, X[:3], Z0), ValueError, "leading axis"),
    "forward config": (lambda: deq_jax.fixed_point(cell, PARAMS, X, Z0, forward="broyden"), ValueError,
                       "forward must be a SolverConfig"),
    "backward config": (lambda: deq_jax.fixed_point(cell, PARAMS, X, Z0, backward=3), ValueError,
                        "backward must be a SolverConfig"),
    "step_limit vector": (lambda: deq_jax.fixed_point(cell, PARAMS, X, Z0, step_limit=jnp.ones(2, jnp.int32)),
                          ValueError, "step_limit must be a scalar"),
    "SolverConfig name": (lambda: deq_jax.SolverConfig("newton"), ValueError, "unknown solver"),
    "SolverConfig tol": (lambda: deq_jax.SolverConfig(tol=-1.0), ValueError, "tol must be a positive"),
    "Phantom steps": (lambda: deq_jax.Phantom(steps=0), ValueError, "Phantom.steps must be a positive int"),
    "Phantom damping": (lambda: deq_jax.Phantom(damping=1.0), ValueError, r"Phantom.damping must be in \[0, 1\)"),
    "unrolled layers": (lambda: deq_jax.unrolled(cell, PARAMS, X, Z0, 0), ValueError, "num_layers must be"),
    "adjoint_solve phantom": (lambda: deq_jax.adjoint_solve(cell, PARAMS, X, Z0, Z0, deq_jax.Phantom()),
                              ValueError, "adjoint_solve needs a SolverConfig"),
    # one example without its batch axis (an Equinox habit): refused, not solved as 16 one-number examples
    "unbatched z0": (lambda: deq_jax.fixed_point(lambda p, x, z: jnp.tanh(p @ z + x), PARAMS, X[0], Z0[0]),
                     ValueError, r"z0 has 1-D leaves \[\(3,\)\].*add the batch axis"),
    "unbatched z0 in a pytree": (lambda: deq_jax.equilibrium(lambda p, x, z: z, None, None, {"a": Z0, "b": Z0[:, 0]}),
                                 ValueError, r"1-D leaves \[\(4,\)\].*shape \[B, 1\]"),
    # Jacobian tools
    "num_probes 0": (lambda: deq_jax.hutchinson_frobenius(F, Z0, KEY, num_probes=0), ValueError,
                     "num_probes must be a positive int"),
    "probe kind": (lambda: deq_jax.hutchinson_frobenius(F, Z0, KEY, probe="uniform"), ValueError,
                   "probe must be one of"),
    "jvp or vjp": (lambda: deq_jax.hutchinson_frobenius(F, Z0, KEY, mode="fwd"), ValueError, "mode must be one of"),
    "key count": (lambda: deq_jax.hutchinson_frobenius(F, Z0, jax.random.split(KEY, 3)), ValueError,
                  "got 3 keys for a batch of 4"),
    "raw keys per example": (lambda: deq_jax.equilibrium(cell, PARAMS, X, Z0, jr_keys=jax.random.split(
        jax.random.PRNGKey(0), 4)), ValueError, r"raw uint32 keys.*jax.random.wrap_key_data"),
    "keys not keys": (lambda: deq_jax.hutchinson_frobenius(F, Z0, jnp.ones((4,))), ValueError, "not PRNG keys"),
    "power iterations": (lambda: deq_jax.spectral_radius(F, Z0, KEY, num_iters=1), ValueError,
                         "num_iters must be an int >= 2"),
    # config resolution
    "unknown key": (lambda: config_lib.resolve({"jr": {"gama": 1.0}}), ValueError, "did you mean 'jr.gamma'"),
    "negative gamma": (lambda: config_lib.resolve({"jr": {"gamma": -1.0}}), ValueError, "jr.gamma must be >= 0"),
    "no DEQ steps": (lambda: config_lib.resolve({"train": {"num_steps": 100, "pretrain_steps": 100}}), ValueError,
                     r"train.pretrain_steps must be in \[0, train.num_steps\)"),
    "lowering rule": (lambda: config_lib.resolve({"forward": {"random_lower_rule": "sometimes"}}), ValueError,
                      "forward.random_lower_rule must be one of"),
    "image size on digits": (lambda: config_lib.resolve({"data": {"image_size": 32}}), ValueError,
                             "data.image_size applies to imagenet2012 only"),
    "budgets text": (lambda: config_lib.resolve({"eval": {"budgets": "a,b"}}), ValueError, "eval.budgets must be"),
    "checkpoint interval": (lambda: config_lib.resolve({"train": {"checkpoint_every": 15}}), ValueError,
                            "must be a multiple of train.log_every"),
    "stop step": (lambda: config_lib.resolve({"jr": {"stop_step": -5}}), ValueError, "jr.stop_step must be -1"),
    # data loaders
    "image data set": (lambda: data.load("mnist"), ValueError, "unknown image data set 'mnist'"),
    "text data set": (lambda: text.load_text("enwik8"), ValueError, "unknown text data set 'enwik8'"),
    "cifar10 not prepared": (lambda: data.load("cifar10", data_dir="/nonexistent"), FileNotFoundError,
                             "tfds build cifar10"),
    "wikitext folder": (lambda: text.load_text("wikitext103", "/nonexistent"), FileNotFoundError,
                        "wiki.train.tokens"),
    "wikitext without folder": (lambda: text.load_text("wikitext103"), FileNotFoundError, "needs data.data_dir"),
    "pydoc unknown characters": (lambda: text.load_pydoc().encode("\u2603"), ValueError,
                                 "characters not in the pydoc vocabulary"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_a_clear_error(case):
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-m", "experiments.train", "--config.jr.gama=1", "--workdir=/nonexistent"],
         'unknown config key in --config.jr.gama: did you mean "gamma" instead of "gama"?'),
        (["-m", "experiments.train", "--config.jr.gamma=abc", "--workdir=/nonexistent"],
         "--config.jr.gamma=abc: could not convert string to float"),
        (["-m", "experiments.train", "--config.train.pretrain_steps=500", "--workdir=/nonexistent"],
         "train.pretrain_steps must be in"),
        (["-m", "experiments.sample", "/nonexistent"], "is not a run folder"),
    ],
)
def test_command_line_entry_points_report_bad_flags(args, message):
    """A usage error is one line on stderr and exit status 2; a traceback would mean a bug."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


def test_xla_cpu_flags_that_jaxlib_does_not_know_cannot_abort_start_up(monkeypatch):
    """XLA aborts the process on an unknown flag: cpu_flags.apply tries them in a subprocess
    first and runs without them (with a warning) when jax would not start."""
    from deq_jax.train import cpu_flags

    # setenv, not delenv: monkeypatch then restores XLA_FLAGS after the test (apply() sets it,
    # and the subprocesses of later tests must not inherit these flags).
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="does not start with them"):
        assert not cpu_flags.apply("--xla_cpu_flag_that_does_not_exist=true")
    assert os.environ["XLA_FLAGS"] == ""
    assert cpu_flags.apply()  # this jaxlib knows the real ones, and the backend is the CPU
    assert os.environ["XLA_FLAGS"] == cpu_flags.CPU_FLAGS


# --- cells that break the DEQ contract, in each framework ----------------------------------


def test_a_cell_closing_over_what_is_differentiated_gets_the_params_hint():
    """The Equinox habit: the loss closes over the cell (params=None). JAX alone says
    UnexpectedTracerError; the layer says to pass the arrays as params, and how."""
    w = 0.3 * jnp.eye(3)

    def loss(w):
        z, _ = deq_jax.equilibrium(lambda p, x, z: jnp.tanh(z @ w + x), None, X, Z0)
        return (z**2).sum()

    with pytest.raises(ValueError, match=r"closes over an array.*eqx.partition"):
        jax.grad(loss)(w)


def test_linen_cells_with_batchnorm_or_an_unlisted_rng_stream_are_named():
    import flax.linen as nn

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x, z):
            return nn.tanh(nn.BatchNorm(use_running_average=False)(nn.Dense(3)(z)) + x)

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x, z):
            return jnp.tanh(nn.Dropout(0.1, deterministic=False, rng_collection="noise")(nn.Dense(3)(z)) + x)

    with pytest.raises(ValueError, match=r"updates its own variables.*nn.LayerNorm"):
        deq_jax.linen.DEQ(Normed()).init(KEY, X)
    with pytest.raises(ValueError, match=r"rng stream 'noise'.*rng_streams=\('dropout', 'noise'\)"):
        deq_jax.linen.DEQ(Noisy()).init({"params": KEY, "noise": KEY}, X)
    listed = deq_jax.linen.DEQ(Noisy(), rng_streams=("dropout", "noise"))  # the fix the message gives
    variables = listed.init({"params": KEY, "noise": KEY}, X)
    z, _ = listed.apply(variables, X, rngs={"noise": KEY})
    assert z.shape == X.shape


def test_an_nnx_cell_with_batchnorm_in_training_mode_is_refused_and_works_in_eval_mode():
    from flax import nnx

    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x, z):
            return jnp.tanh(0.5 * self.norm(self.linear(z)) + x)

    layer = deq_jax.nnx.DEQ(Cell(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"BatchNorm at 'norm' is in training mode.*\.eval\(\)"):
        layer(X)
    layer.eval()  # running averages: a fixed affine map, a fine cell
    z, stats = layer(X)
    assert bool(stats.result.converged.all())
