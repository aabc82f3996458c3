"""What Jacobian regularization costs: the JR term in f evaluations, and the DEQ train step.

    python benchmarks/jr_cost.py                          # every cell and both configs (~4 min, 2 cores)
    python benchmarks/jr_cost.py --cells dense,conv --configs ""
    python benchmarks/jr_cost.py --cells "" --configs digits --repeats 20

**The JR term per cell** (dense, conv: ``benchmarks/problems.py``; ``mdeq_digits``: the
Quickstart's MDEQ cell on a batch of 32 digits; ``transformer``: the pydoc
DEQ-Transformer cell, 16 windows of 64 tokens). Each cell ``f(params, x, z)`` is timed at
a state two applications from zero, as jitted functions of ``(params, x, z)``:

* ``f``: one evaluation (the unit: every other column is its time over f's);
* ``f + backprop``: f and its first-order gradient with respect to params, x and z (what
  one layer of ordinary backpropagation costs, for reference);
* ``JR``: the Hutchinson estimate ``||J_f(z)||_F^2 / d`` with one Gaussian probe per
  example, as ``||eps^T J||^2`` (``vjp``, the paper's) and as ``||J eps||^2`` (``jvp``;
  for Gaussian probes both have the same distribution);
* ``JR + grad``: the estimate and its gradient with respect to params and x, a second-order
  pass: what a training step with JR adds to one without.

**The DEQ train step** of a config (``digits``: the Quickstart, MDEQ; ``pydoc``: the
DEQ-Transformer, no convolutions) with the JR term on every step (``jr.mode`` jvp, the
default, and vjp) against the step without it, at equal solver work:
``forward.early_exit`` and ``backward.early_exit`` False and ``forward.random_lower`` 0,
so both solves run exactly their limit (``fwd_nfe`` and ``bwd_nfe`` are printed). A last
row runs one solver step each way: the part of a step that does not shrink with the
solver limits (injection, head, loss, optimizer). The two compiled steps
(``make_train_step(..., jr=True/False)``, what the training loop runs) are timed in
interleaved rounds over the same batches.

Times: minimum over interleaved rounds (the machine's noise only adds); ratios come from
one run. Convolutions are checked in the compiled code: ``fast conv`` counts those in the
layout XLA's CPU backend runs fast (``b01f_01io->b01f``) against all of them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

if __name__ == "__main__":
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if ROOT not in sys.path:  # `python benchmarks/jr_cost.py` without PYTHONPATH=.
        sys.path.insert(0, ROOT)
    import deq_jax.train.cpu_flags as cpu_flags

    cpu_flags.apply()  # the flags the training entry points use, before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import problems  # noqa: E402
from benchmarks.solvers import _table, _time  # noqa: E402
from deq_jax import jacobian  # noqa: E402

FAST_CONV = "b01f_01io->b01f"


def mdeq_digits(batch: int = 32):
    """The Quickstart's MDEQ cell (digits size) on ``batch`` digits images at initialization."""
    from deq_jax import data
    from deq_jax.models import MDEQ

    model = MDEQ("digits")
    images, _ = data.train_batch(data.load_digits(), 0, batch, seed=0)
    images = jnp.asarray(images)
    params = model.init(jax.random.key(0), images, unroll=1)["params"]
    x = model.apply({"params": params}, images, method="inject")

    def f(p, x, z):
        return model.apply({"params": p}, x, z, method="cell")

    return f, params, x, model.apply({"params": params}, x, method="initial_state")


CELLS = {
    "dense": lambda: problems.dense(0.9),
    "conv": problems.conv,
    "mdeq_digits": mdeq_digits,
    "transformer": lambda: problems.transformer(gain=1.0),
}


def conv_labels(fn, *args) -> tuple[int, int]:
    """``(fast, all)`` convolutions of ``fn``'s compiled code."""
    labels = re.findall(r"dim_labels=([\w>-]+)", jax.jit(fn).lower(*args).compile().as_text())
    return sum(label == FAST_CONV for label in labels), len(labels)


def cell_row(name: str, repeats: int) -> list:
    f, params, x, z = CELLS[name]()
    z = f(params, x, f(params, x, z))
    batch = jax.tree.leaves(z)[0].shape[0]
    keys = jax.random.split(jax.random.key(1), batch)
    ones = jax.tree.map(jnp.ones_like, z)

    def backprop(p, x, z):
        out = f(p, x, z)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ones), strict=True))

    def jr(mode):
        def estimate(p, x, z):
            return jnp.mean(jacobian.hutchinson_frobenius(lambda zz: f(p, x, zz), z, keys, mode=mode))

        return estimate

    fns = [f, jax.value_and_grad(backprop, argnums=(0, 1, 2))]
    for mode in ("vjp", "jvp"):
        fns += [jr(mode), jax.value_and_grad(jr(mode), argnums=(0, 1))]
    times = _time([(jax.jit(fn), (params, x, z)) for fn in fns], repeats)
    fast, total = zip(*(conv_labels(fn, params, x, z) for fn in fns[3::2]))
    eq = [t / times[0] for t in times[1:]]
    convs = "–" if not sum(total) else " / ".join(f"{a}/{b}" for a, b in zip(fast, total, strict=True))
    return [name, f"{1e3 * times[0]:.2f}", f"{eq[0]:.2f}", f"{eq[1]:.2f}", f"{eq[2]:.2f}", f"{eq[3]:.2f}",
            f"{eq[4]:.2f}", convs]


def step_config(name: str, overrides: dict | None = None):
    """The config's solves at exactly their limit, with ``overrides`` (``{group: {key: value}}``)."""
    from deq_jax.configs import digits, lm_pydoc
    from deq_jax.train import config as config_lib

    c = {"digits": digits, "pydoc": lm_pydoc}[name].get_config()
    c.forward.early_exit = c.backward.early_exit = False
    c.forward.random_lower = 0
    c.jr.mode = "jvp"
    for group, values in (overrides or {}).items():
        c[group].update(values)
    return config_lib.resolve(c)


# (label, JR term, config overrides). The last row is the step's floor: one solver step each
# way, what the step costs outside the solves.
STEPS = (("no JR", False, {}), ("JR every step, jr.mode jvp", True, {}),
         ("JR every step, jr.mode vjp", True, {"jr": {"mode": "vjp"}}),
         ("no JR, limits 1/1", False, {"forward": {"max_steps": 1}, "backward": {"max_steps": 1}}))


def step_rows(name: str, repeats: int, settings=STEPS) -> list[list]:
    """The config's DEQ train step in each of ``settings`` (the first is the baseline),
    timed in interleaved rounds over the same 4 batches. A row: config, label, f / VJP
    evaluations of the forward and backward pass, median and min ms, their ratios to the
    baseline, conditionals and fast convolutions in the compiled step, and XLA's temporary
    memory of the compiled step (MB; its peak working memory beyond parameters and batch)."""
    from deq_jax.train import step as step_lib
    from deq_jax.train.optim import make_optimizer
    from deq_jax.train.tasks import make_task

    task = make_task(step_config(name))
    mesh = step_lib.make_mesh()
    batches = [task.train_batch(s, None) for s in range(4)]
    runs = {}
    for label, jr, overrides in settings:
        c = step_config(name, overrides)
        tx, lr = make_optimizer(c)
        state = step_lib.init_state(task.model, c, tx, task.sample_input, mesh)
        train_step = step_lib.make_train_step(task.model, c, tx, lr, mesh, "deq", jr=jr)
        compiled = train_step.lower(state, *batches[0]).compile()
        text = compiled.as_text()
        labels = re.findall(r"dim_labels=([\w>-]+)", text)
        state, metrics = compiled(state, *batches[0])  # warm up
        runs[label] = {"compiled": compiled, "state": state, "times": [], "metrics": jax.device_get(metrics),
                       "conds": text.count("conditional("), "convs": (sum(x == FAST_CONV for x in labels), len(labels)),
                       "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}
    for _ in range(repeats):
        for r in runs.values():
            for batch in batches:
                start = time.perf_counter()
                r["state"], metrics = r["compiled"](r["state"], *batch)
                jax.block_until_ready(metrics)
                r["times"].append(time.perf_counter() - start)
    base = runs[settings[0][0]]["times"]
    rows = []
    for label, r in runs.items():
        m, (fast, total) = r["metrics"], r["convs"]
        rows.append([name, label, f"{m['fwd_nfe']:.0f} / {m['bwd_nfe']:.0f}",
                     f"{1e3 * statistics.median(r['times']):.1f}", f"{1e3 * min(r['times']):.1f}",
                     f"{statistics.median(r['times']) / statistics.median(base):.2f}",
                     f"{min(r['times']) / min(base):.2f}", r["conds"], f"{fast}/{total}" if total else "–",
                     f"{r['temp_mb']:.1f}"])
    return rows


STEP_HEADER = ["config", "step", "fwd / bwd NFE", "median ms", "min ms", "median / first", "min / first",
               "conditionals", "fast conv", "XLA temp MB"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--configs", default="digits,pydoc")
    parser.add_argument("--repeats", type=int, default=30, help="rounds per cell; rounds of 4 steps per config")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"default matmul precision {jax.config.jax_default_matmul_precision or 'default'}\n")
    cells = [c for c in args.cells.split(",") if c]
    if cells:
        print("The JR term per cell, in f evaluations (time / time of one f):\n")
        print(_table(["cell", "f (ms)", "f + backprop", "JR vjp", "JR vjp + grad", "JR jvp", "JR jvp + grad",
                      "fast conv (vjp+grad / jvp+grad)"], [cell_row(name, args.repeats) for name in cells]))
        print()
    configs = [c for c in args.configs.split(",") if c]
    if configs:
        print("The DEQ train step at equal solver work (both solves run their whole limit):\n")
        rows = [row for name in configs for row in step_rows(name, max(2, args.repeats // 3))]
        print(_table(STEP_HEADER, rows))


if __name__ == "__main__":
    main()
