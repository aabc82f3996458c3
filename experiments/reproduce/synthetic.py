"""The paper's synthetic 1-D experiment: a 200-parameter DEQ trained with gamma in {0, 1, 2, 4}.

    python -m experiments.reproduce.synthetic                      # the paper's protocol, 3 seeds
    python -m experiments.reproduce.synthetic --size=large         # 10x the epochs
    python -m experiments.reproduce.synthetic --seeds=0,1,2,3,4    # more seeds

Model (paper, Section 5.1): z* = f(z*; x) with f(z; x) = W2^T ReLU(W1 z + U x + b), z and
x scalars, hidden width 50 (W1, U, b, W2: 4 x 50 = 200 parameters); the prediction is z*.

Data (paper, Section 5.1 and appendix A.1): 5096 pairs (x, y) with

    y = h(x) + delta,   h(x) = (3/2) x^3 + x^2 - 5 x + 2 sin(x) - 3,   delta ~ N(0, 0.05),

split into 4096 training and 1000 validation pairs. Three choices are ours:

* **-5x, not +5x.** Section 5.1 prints "- 5x"; appendix A.1 prints "+ 5x" in one place.
  We follow Section 5.1 (a PDF-text extraction of it, with its minus signs dropped, agrees
  on the other terms).
* **N(0, 0.05) read as standard deviation 0.05.** The paper does not say whether 0.05 is
  a standard deviation or a variance. Its authors write the initialization as "N(0, 0.01)"
  (appendix A.4) and their code draws it with ``normal_(0, 0.01)``, which takes a standard
  deviation; we read both the same way (:data:`NOISE_SD`, :data:`INIT_SD`).
* **x ~ Uniform[-2, 2].** The input range is not stated in the text (only the paper's
  Figure 9, a plot of h, would show it). On [-2, 2] h spans about [-4.2, 4.8].

The data are drawn once from ``--data_seed`` (default 0; the paper has one data set);
``--seeds`` vary the initialization, batch order and JR probes.

Training follows the paper's Table 4 for this task: 50 epochs of batch 64 (4096 / 64 = 64
steps per epoch, 3,200 steps; each epoch a fresh permutation of the training pairs), Adam
with learning rate 1e-3 on a cosine schedule to 0, no weight decay, every parameter
initialized from N(0, 0.01) (appendix A.4: "all parameters are initialized ... by sampling
from N(0,0.01)"), Broyden forward with at most 6 steps and tolerance 1e-3, implicit
Broyden backward with at most 6 steps and tolerance 1e-4 (relative residuals, appendix
A.5), JR with probability p = 0.4 and M = 1 probe. The paper names no solver for this
task; Broyden is what its code uses elsewhere. Here J_f(z*) is the scalar df/dz, so
||J||_F^2 = (df/dz)^2, computed exactly for the report (training uses the Hutchinson
estimate, as on larger models).

``--size=small`` (default) *is* the paper's protocol (50 epochs, all 5096 points): it
takes about a minute per seed for the four gammas on 2 CPU cores (every gamma and seed
shares one compiled training step). ``--size=large`` trains 10x the epochs (500), with
the cosine schedule stretched to match. ``--epochs`` sets any other length (the tests use
tiny ones).

Writes ``results.md`` (mean ± sample standard deviation over seeds, every seed's numbers
in ``results.json``), ``fit.png`` (z*(x) per gamma, mean over seeds and each seed),
``steps.png`` (Broyden steps to tol per x) and ``slice.png`` (the paper's Figure 5,
bottom: the slice f(z; x = -1) against z for each gamma, first seed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import deq_jax  # noqa: E402
from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

N_TRAIN, N_VALID = 4096, 1000  # paper: 5096 pairs, 4096 train / 1000 validation
X_RANGE = (-2.0, 2.0)  # ours: the paper does not state the input range
NOISE_SD = 0.05  # delta ~ N(0, 0.05), read as a standard deviation (see module doc)
INIT_SD = 0.01  # every parameter ~ N(0, 0.01) (appendix A.4), read as a standard deviation
BATCH = 64
LEARNING_RATE = 1e-3
JR_PROB = 0.4
SIZES = {"small": {"epochs": 50}, "large": {"epochs": 500}}
HIDDEN = 50
FWD_STEPS, BWD_STEPS = 6, 6
FWD_TOL, BWD_TOL = 1e-3, 1e-4
TOL = FWD_TOL  # the forward tolerance, for "steps to reach tol"
EVAL_STEPS = 50  # generous limit for "steps needed to reach tol"
SLICE_X = -1.0  # the paper's Figure 5 highlights the slice at x = -1


def target(x):
    """The noise-free target h(x) = 1.5 x^3 + x^2 - 5 x + 2 sin(x) - 3 (paper, Section 5.1)."""
    return 1.5 * x**3 + x**2 - 5.0 * x + 2.0 * np.sin(x) - 3.0


def make_data(n_train: int = N_TRAIN, seed: int = 0, n_valid: int = N_VALID):
    """``(x_train, y_train, x_valid, y_valid)``, each ``[n, 1]`` float32: ``n_train + n_valid``
    pairs x ~ Uniform[-2, 2], y = h(x) + N(0, 0.05^2), the first ``n_train`` for training."""
    rng = np.random.default_rng(seed)
    n = n_train + n_valid
    x = rng.uniform(*X_RANGE, size=(n, 1))
    y = target(x) + rng.normal(0.0, NOISE_SD, size=(n, 1))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def cell(params, x, z):
    """``f(z; x) = W2^T ReLU(W1 z + U x + b)`` for ``z, x`` ``[B, 1]``."""
    h = jax.nn.relu(z @ params["w1"] + x @ params["u"] + params["b"])
    return h @ params["w2"]


def init_params(key):
    """Every parameter from N(0, INIT_SD^2) (the paper's appendix A.4)."""
    shapes = {"w1": (1, HIDDEN), "u": (1, HIDDEN), "b": (HIDDEN,), "w2": (HIDDEN, 1)}
    keys = jax.random.split(key, len(shapes))
    return {name: INIT_SD * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items(), strict=True)}


def solve(params, x, max_steps):
    """z*(x) by Broyden (at most ``max_steps`` steps, tol 1e-3), implicit backward (6, 1e-4)."""
    fwd = deq_jax.SolverConfig("broyden", max_steps, FWD_TOL, "rel")
    bwd = deq_jax.SolverConfig("broyden", BWD_STEPS, BWD_TOL, "rel")
    return deq_jax.fixed_point(cell, params, x, jnp.zeros_like(x), forward=fwd, backward=bwd)


def df_dz(params, x, z):
    """Exact ``df/dz`` at ``z`` per example ``[B]`` (scalar state: the whole Jacobian)."""
    return jax.vmap(jax.grad(lambda zz, xx: cell(params, xx[None], zz[None])[0, 0]))(z[:, 0], x)


@functools.lru_cache(maxsize=4)
def _train_step(n_train: int, total_steps: int):
    """One jitted step for every gamma and seed (both traced): compiled once per data size
    and training length."""
    tx = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, total_steps))
    per_epoch = n_train // BATCH

    @jax.jit
    def step(params, opt, t, gamma, seed, x_train, y_train):
        key = jax.random.fold_in(jax.random.key(seed), t)
        # Epoch e visits the training set in the order permutation(seed, e).
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(seed + 1), t // per_epoch), n_train)
        idx = jax.lax.dynamic_slice(order, ((t % per_epoch) * BATCH,), (BATCH,))
        x, y = x_train[idx], y_train[idx]
        apply = jax.random.bernoulli(jax.random.fold_in(key, 1), JR_PROB)

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

    return tx, step


def warm_up(data, steps: int) -> float:
    """Compiles the training step for this data size and length (one step, discarded);
    returns the seconds it took, so that training times exclude compilation."""
    t0 = time.perf_counter()
    x_train, y_train = jnp.asarray(data[0]), jnp.asarray(data[1])
    tx, step = _train_step(int(x_train.shape[0]), int(steps))
    params = init_params(jax.random.key(0))
    jax.block_until_ready(step(params, tx.init(params), jnp.int32(0), jnp.float32(0), jnp.int32(0), x_train, y_train))
    return time.perf_counter() - t0


def train(gamma: float, data, steps: int, seed: int, log_every: int = 0, on_log=None):
    """Adam (cosine learning rate over ``steps``) on MSE + gamma * Hutchinson JR applied
    with probability 0.4, batches of 64 in epochs; returns the parameters.

    ``on_log(step, params)`` is called every ``log_every`` steps (and at the end) if given.
    """
    x_train, y_train = jnp.asarray(data[0]), jnp.asarray(data[1])
    if x_train.shape[0] < BATCH:
        raise ValueError(f"need at least {BATCH} training pairs, got {x_train.shape[0]}")
    tx, step = _train_step(int(x_train.shape[0]), int(steps))
    params = init_params(jax.random.key(seed))
    opt = tx.init(params)
    gamma, seed_ = jnp.float32(gamma), jnp.int32(seed)
    for t in range(steps):
        params, opt = step(params, opt, jnp.int32(t), gamma, seed_, x_train, y_train)
        if on_log is not None and ((log_every and (t + 1) % log_every == 0) or t + 1 == steps):
            on_log(t + 1, params)
    return params


@functools.partial(jax.jit, static_argnums=2)
def _solve_stats(params, x, max_steps):
    z, r = solve(params, x, max_steps)
    return z, r.rel_residual, r.converged, r.n_steps, df_dz(params, x, z)


def evaluate(params, x, y) -> dict:
    """MSE on ``(x, y)`` at 6 Broyden steps (``mse``; ``test_mse`` is the same number),
    residual at 6 steps, steps to reach tol within 50, (df/dz)^2 at that solution."""
    z6, res6, _, _, _ = _solve_stats(params, jnp.asarray(x), FWD_STEPS)
    _, _, converged, n_steps, slope = _solve_stats(params, jnp.asarray(x), EVAL_STEPS)
    steps = jnp.where(converged, n_steps, EVAL_STEPS)
    mse = float(jnp.mean((z6 - jnp.asarray(y)) ** 2))
    return {
        "mse": mse,
        "test_mse": mse,
        "residual_at_6": float(jnp.mean(res6)),
        "steps_to_tol": float(jnp.mean(steps)),
        "reached_tol": float(jnp.mean(converged)),
        "jac_sq": float(jnp.mean(slope**2)),
        "per_example_steps": np.asarray(steps),
    }


def slice_curve(params, x0: float, half_width: float = 3.0, n: int = 200):
    """``(z, f(z; x0), z*)`` on a grid of z around the fixed point z*(x0) (paper Figure 5)."""
    x = jnp.full((1, 1), x0, jnp.float32)
    z_star = float(_solve_stats(params, x, EVAL_STEPS)[0][0, 0])
    z = np.linspace(z_star - half_width, z_star + half_width, n, dtype=np.float32)[:, None]
    fz = np.asarray(cell(params, jnp.full_like(z, x0), jnp.asarray(z)))
    return z[:, 0], fz[:, 0], z_star


KEYS = ("mse", "steps_to_tol", "reached_tol", "residual_at_6", "jac_sq", "train_s")
COLUMNS = (  # (key, header, format)
    ("mse", "validation MSE (6 steps)", ".4f"),
    ("steps_to_tol", f"steps to reach tol {TOL:g} (cap {EVAL_STEPS})", ".2f"),
    ("reached_tol", "reached tol", "%"),
    ("residual_at_6", "residual at 6 steps", ".1e"),
    ("jac_sq", "mean (df/dz)² at z*", ".3f"),
    ("train_s", "train time (s)", ".0f"),
)


def plot(results, data, grid, out: Path) -> list[Path]:
    plt = figures.pyplot()
    x_valid, y_valid = data[2], data[3]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(x_valid[:, 0], y_valid[:, 0], s=3, c="0.6", label="validation data")
    ax.plot(grid[:, 0], target(grid[:, 0]), c="k", lw=0.8, ls=":", label="h(x) without noise")
    for gamma, r in results.items():
        mse = runs.pm([s["mse"] for s in r["seeds"]], ".4f")
        figures.seed_lines(ax, grid[:, 0], [s["grid_z"] for s in r["seeds"]], f"γ = {gamma:g} (MSE {mse})")
    ax.set(xlabel="x", ylabel="prediction z*(x) at 6 Broyden steps",
           title="Learned equilibrium vs data (mean over seeds; thin: each seed)")
    ax.legend(fontsize=8)
    paths = [figures.save(fig, out / "fit.png")]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gamma, r in results.items():
        steps = runs.pm([s["steps_to_tol"] for s in r["seeds"]], ".1f")
        figures.seed_lines(ax, grid[:, 0], [s["grid_steps"] for s in r["seeds"]], f"γ = {gamma:g} (mean {steps})")
    ax.set(xlabel="x", ylabel=f"Broyden steps to reach rel. residual {TOL:g} (cap {EVAL_STEPS})",
           title="Forward solver steps per input (mean over seeds; thin: each seed)")
    ax.legend(fontsize=8)
    paths.append(figures.save(fig, out / "steps.png"))

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.6), squeeze=False)
    for ax, (gamma, r) in zip(axes[0], results.items(), strict=True):
        z, fz, z_star = r["seeds"][0]["slice"]
        ax.plot(z, fz, label=f"f(z; x = {SLICE_X:g})")
        ax.plot(z, z, c="k", lw=0.8, ls=":", label="z")
        ax.plot([z_star], [z_star], "o", c="C3", label=f"z* (df/dz = {r['seeds'][0]['slice_slope']:.2f})")
        ax.set(xlabel="z", title=f"γ = {gamma:g} (seed {r['seeds'][0]['seed']})")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("layer output")
    paths.append(figures.save(fig, out / "slice.png"))
    return paths


def run(out: str, size: str = "small", gammas=(0.0, 1.0, 2.0, 4.0), seeds=runs.DEFAULT_SEEDS,
        data_seed: int = 0, epochs: int | None = None, n_train: int = N_TRAIN, n_valid: int = N_VALID) -> dict:
    """Trains one model per gamma and seed, writes the table and figures; returns
    ``{gamma: {"seeds": [per-seed numbers], "mean": {...}, "sd": {...}}}``.

    ``epochs`` replaces the size's (the tests use tiny ones); ``n_train``/``n_valid``
    change the data size (default: the paper's 4096 / 1000).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = SIZES[size]["epochs"] if epochs is None else epochs
    steps = epochs * (n_train // BATCH)
    data = make_data(n_train, data_seed, n_valid)
    grid = np.linspace(*X_RANGE, 400, dtype=np.float32)[:, None]
    compile_s = warm_up(data, steps)
    results = {}
    for gamma in gammas:
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            params = jax.block_until_ready(train(gamma, data, steps, seed))
            train_s = time.perf_counter() - t0
            r = evaluate(params, data[2], data[3])
            g = evaluate(params, grid, np.zeros_like(grid))
            z, fz, z_star = slice_curve(params, SLICE_X)
            slope = float(df_dz(params, jnp.full((1, 1), SLICE_X), jnp.full((1, 1), z_star))[0])
            r |= {"seed": seed, "train_s": train_s, "grid_steps": g["per_example_steps"],
                  "grid_z": np.asarray(_solve_stats(params, jnp.asarray(grid), FWD_STEPS)[0][:, 0]),
                  "slice": (z, fz, z_star), "slice_slope": slope}
            per_seed.append(r)
            print(f"gamma {gamma:g} seed {seed}: validation MSE {r['mse']:.4f} | steps to tol "
                  f"{r['steps_to_tol']:.2f} ({r['reached_tol']:.0%} reached) | (df/dz)^2 {r['jac_sq']:.3f} | "
                  f"{train_s:.0f} s", flush=True)
        stats = {k: runs.spread([s[k] for s in per_seed]) for k in KEYS}
        results[gamma] = {"seeds": per_seed, "mean": {k: m for k, (m, _) in stats.items()},
                          "sd": {k: sd for k, (_, sd) in stats.items()}}
    paths = plot(results, data, grid, out)
    lines = [
        f"Mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); one data "
        f"set (data seed {data_seed}). Validation: the {n_valid} held-out pairs. Train time excludes compiling the "
        f"one training step all runs share ({compile_s:.1f} s).",
        "",
        "| γ | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for gamma, r in results.items():
        cells = [runs.pm([s[k] for s in r["seeds"]], fmt) for k, _, fmt in COLUMNS]
        lines.append(f"| {gamma:g} | " + " | ".join(cells) + " |")
    lines += ["", runs.RULE, ""]
    reference = gammas[0]
    for gamma in gammas[1:]:
        for key, what, fmt in (("mse", "validation MSE", ".4f"), ("steps_to_tol", "steps to reach tol", ".2f"),
                               ("jac_sq", "(df/dz)² at z*", ".3f")):
            lines.append(runs.compare_line(what, f"γ = {gamma:g}", [s[key] for s in results[gamma]["seeds"]],
                                           f"γ = {reference:g}", [s[key] for s in results[reference]["seeds"]], fmt))
    heading = (f"Synthetic 1-D DEQ ({size}: {epochs} epochs = {steps} steps of batch {BATCH}, {n_train} train / "
               f"{n_valid} validation pairs, x ~ U[{X_RANGE[0]:g}, {X_RANGE[1]:g}])")
    saved = {
        f"{g:g}": {
            "mean": r["mean"], "sd": r["sd"],
            "seeds": [{k: v for k, v in s.items() if k in KEYS + ("seed", "slice_slope")} for s in r["seeds"]],
        }
        for g, r in results.items()
    }
    saved["protocol"] = {"compile_s": compile_s, "epochs": epochs, "steps": steps, "n_train": n_train,
                         "n_valid": n_valid, "data_seed": data_seed, "x_range": list(X_RANGE), "noise_sd": NOISE_SD,
                         "init_sd": INIT_SD}
    figures.write_results(out, heading, lines, paths, saved)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gammas = tuple(float(g) for g in FLAGS.gammas)
    run(FLAGS.out, FLAGS.size, gammas, runs.parse_seeds(FLAGS.seeds), FLAGS.data_seed, FLAGS.epochs)
    print(f"wrote {FLAGS.out}/results.md, fit.png, steps.png, slice.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none, so
    several scripts can be imported into one process)."""
    flags.DEFINE_string("out", "results/synthetic", "Results folder.")
    flags.DEFINE_enum("size", "small", list(SIZES), "small: the paper's 50 epochs; large: 500 epochs.")
    flags.DEFINE_list("gammas", ["0", "1", "2", "4"], "JR weights to train with (the first is the reference).")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds (initialization, batch order, probes), comma-separated.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the one data set.")
    flags.DEFINE_integer("epochs", None, "Epochs, replacing the size's (e.g. 1 for a quick check).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
