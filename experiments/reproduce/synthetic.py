"""The paper's synthetic 1-D experiment: a 200-parameter DEQ trained with gamma in {0, 1, 2, 4}.

    python -m experiments.reproduce.synthetic                      # small: about a minute
    python -m experiments.reproduce.synthetic --size=large         # 10x the steps and data

Model: z* = f(z*; x) with f(z; x) = W2^T ReLU(W1 z + U x + b), z and x scalars, hidden
width 50 (W1, U, b, W2: 4 x 50 = 200 parameters); the prediction is z* itself.

Data (ours; the paper does not publish its set): x ~ Uniform[-2, 2] and
y = sin(2x) + 0.4 x + noise with sd 0.05, 512 training and 512 test points (small), drawn
from a fixed seed; a 400-point grid for the plots.

Training follows the paper's Table 4 for this task: batch 64, Adam 1e-3, Broyden forward
and implicit Broyden backward with 6 steps each (tol 1e-3), JR applied with probability
0.4 with 1 probe. Here J_f(z*) is the scalar df/dz, so ||J||_F^2 = (df/dz)^2, computed
exactly for the report (training uses the Hutchinson estimate, as on larger models).

Writes ``results.md`` (one table) and ``fit.png``, ``steps.png`` into ``--out``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import deq_jax  # noqa: E402
from experiments.reproduce import figures  # noqa: E402

FLAGS = flags.FLAGS

SIZES = {"small": {"steps": 3000, "n": 512}, "large": {"steps": 30000, "n": 5120}}
HIDDEN = 50
FWD_STEPS, BWD_STEPS, TOL = 6, 6, 1e-3
EVAL_STEPS = 50  # generous limit for "steps needed to reach tol"


def make_data(n: int, seed: int):
    """``(x_train, y_train, x_test, y_test)``, each ``[n, 1]`` float32."""
    rng = np.random.default_rng(seed)

    def draw(m):
        x = rng.uniform(-2.0, 2.0, size=(m, 1))
        return x.astype(np.float32), (np.sin(2 * x) + 0.4 * x + rng.normal(0, 0.05, (m, 1))).astype(np.float32)

    return (*draw(n), *draw(n))


def cell(params, x, z):
    """``f(z; x) = W2^T ReLU(W1 z + U x + b)`` for ``z, x`` ``[B, 1]``."""
    h = jax.nn.relu(z @ params["w1"] + x @ params["u"] + params["b"])
    return h @ params["w2"]


def init_params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    scale = 1.0 / np.sqrt(HIDDEN)
    return {
        "w1": jax.random.normal(k1, (1, HIDDEN)) * 0.5,
        "u": jax.random.normal(k2, (1, HIDDEN)),
        "b": jax.random.normal(k3, (HIDDEN,)) * 0.5,
        "w2": jax.random.normal(k4, (HIDDEN, 1)) * scale,
    }


def solve(params, x, max_steps):
    cfg = deq_jax.SolverConfig("broyden", max_steps, TOL, "rel")
    bwd = deq_jax.SolverConfig("broyden", BWD_STEPS, TOL, "rel")
    return deq_jax.fixed_point(cell, params, x, jnp.zeros_like(x), forward=cfg, backward=bwd)


def df_dz(params, x, z):
    """Exact ``df/dz`` at ``z`` per example ``[B]`` (scalar state: the whole Jacobian)."""
    return jax.vmap(jax.grad(lambda zz, xx: cell(params, xx[None], zz[None])[0, 0]))(z[:, 0], x)


def train(gamma: float, data, steps: int, seed: int, log_every: int = 0, on_log=None):
    """Adam on MSE + gamma * Hutchinson JR (probability 0.4); returns the parameters.

    ``on_log(step, params)`` is called every ``log_every`` steps (and at the end) if given.
    """
    x_train, y_train = jnp.asarray(data[0]), jnp.asarray(data[1])
    tx = optax.adam(1e-3)
    params = init_params(jax.random.key(seed))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, t):
        key = jax.random.fold_in(jax.random.key(seed + 1), t)
        idx = jax.random.choice(jax.random.fold_in(key, 0), x_train.shape[0], (64,), replace=False)
        x, y = x_train[idx], y_train[idx]
        apply = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.4)

        def loss_fn(p):
            z, _ = solve(p, x, FWD_STEPS)
            mse = jnp.mean((z - y) ** 2)
            jr = deq_jax.hutchinson_frobenius(
                lambda zz: cell(p, x, zz), jax.lax.stop_gradient(z), jax.random.fold_in(key, 2)
            )
            return mse + jnp.where(apply, gamma, 0.0) * jnp.mean(jr)

        grads = jax.grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for t in range(steps):
        params, opt = step(params, opt, jnp.int32(t))
        if on_log is not None and ((log_every and (t + 1) % log_every == 0) or t + 1 == steps):
            on_log(t + 1, params)
    return params


def evaluate(params, x, y) -> dict:
    z6, r6 = solve(params, x, FWD_STEPS)
    z_tol, r_tol = solve(params, x, EVAL_STEPS)
    steps = jnp.where(r_tol.converged, r_tol.n_steps, EVAL_STEPS)
    return {
        "test_mse": float(jnp.mean((z6 - y) ** 2)),
        "residual_at_6": float(jnp.mean(r6.rel_residual)),
        "steps_to_tol": float(jnp.mean(steps)),
        "reached_tol": float(jnp.mean(r_tol.converged)),
        "jac_sq": float(jnp.mean(df_dz(params, x, z_tol) ** 2)),
        "per_example_steps": np.asarray(steps),
    }


def plot(results, data, grid, out: Path) -> list[Path]:
    plt = figures.pyplot()
    x_test, y_test = data[2], data[3]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(x_test[:, 0], y_test[:, 0], s=4, c="0.6", label="test data")
    for gamma, r in results.items():
        ax.plot(grid[:, 0], r["grid_z"][:, 0], label=f"γ = {gamma:g} (MSE {r['test_mse']:.4f})")
    ax.set(xlabel="x", ylabel="prediction z*(x) at 6 Broyden steps", title="Learned equilibrium vs data")
    ax.legend(fontsize=8)
    fit = figures.save(fig, out / "fit.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = np.argsort(grid[:, 0])
    for gamma, r in results.items():
        ax.plot(grid[order, 0], r["grid_steps"][order], label=f"γ = {gamma:g} (mean {r['steps_to_tol']:.1f})")
    ax.set(
        xlabel="x",
        ylabel=f"Broyden steps to reach rel. residual {TOL:g} (cap {EVAL_STEPS})",
        title="Forward solver steps per input",
    )
    ax.legend(fontsize=8)
    steps = figures.save(fig, out / "steps.png")
    return [fit, steps]


def run(out: str, size: str = "small", gammas=(0.0, 1.0, 2.0, 4.0), seed: int = 0, **overrides) -> dict:
    """Trains one model per gamma and writes the table and figures; returns the results.

    ``overrides``: ``steps`` and/or ``n`` replacing the size's (the tests use tiny ones).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SIZES[size] | overrides
    data = make_data(cfg["n"], seed)
    grid = np.linspace(-2, 2, 400, dtype=np.float32)[:, None]
    results = {}
    for gamma in gammas:
        t0 = time.perf_counter()
        params = train(gamma, data, cfg["steps"], seed)
        r = evaluate(params, data[2], data[3])
        g = evaluate(params, grid, np.zeros_like(grid))
        r |= {"train_s": time.perf_counter() - t0, "grid_steps": g["per_example_steps"],
              "grid_z": np.asarray(solve(params, grid, FWD_STEPS)[0])}
        results[gamma] = r
        print(f"gamma {gamma:g}: test MSE {r['test_mse']:.4f} | steps to tol {r['steps_to_tol']:.1f} "
              f"({r['reached_tol']:.0%} reached) | (df/dz)^2 {r['jac_sq']:.3f} | {r['train_s']:.0f} s", flush=True)
    paths = plot(results, data, grid, out)
    lines = [
        f"| γ | test MSE (6 steps) | steps to reach tol {TOL:g} (cap {EVAL_STEPS}) | reached tol | "
        "residual at 6 steps | mean (df/dz)² at z* | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for gamma, r in results.items():
        lines.append(
            f"| {gamma:g} | {r['test_mse']:.4f} | {r['steps_to_tol']:.1f} | {r['reached_tol']:.0%} | "
            f"{r['residual_at_6']:.1e} | {r['jac_sq']:.3f} | {r['train_s']:.0f} s |"
        )
    heading = (f"Synthetic 1-D DEQ ({size}: {cfg['steps']} steps, {cfg['n']} train / {cfg['n']} test points, "
               f"seed {seed})")
    summary = {str(g): {k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for g, r in results.items()}
    figures.write_results(out, heading, lines, paths, summary)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gammas = tuple(float(g) for g in FLAGS.gammas.split(","))
    run(FLAGS.out, FLAGS.size, gammas, FLAGS.seed)
    print(f"wrote {FLAGS.out}/results.md, fit.png, steps.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none, so
    several scripts can be imported into one process)."""
    flags.DEFINE_string("out", "results/synthetic", "Results folder.")
    flags.DEFINE_enum("size", "small", ["small", "large"], "small: 3000 steps, 512 points; large: 10x both.")
    flags.DEFINE_string("gammas", "0,1,2,4", "JR weights to train with.")
    flags.DEFINE_integer("seed", 0, "Seed for data, initialization and probes.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
