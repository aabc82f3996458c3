"""GPU benchmark: deq_jax's solvers next to torchdeq 0.1.0 on the same cells, and the
project's own train steps.

On the GPU machine (JAX with CUDA, Flax, optax, chex; PyTorch and torchdeq==0.1.0 for the
torchdeq rows), from the repository root:

    PYTHONPATH=. python benchmarks/gpu.py --out benchmarks/results_gpu_<device>.md
    PYTHONPATH=. python benchmarks/gpu.py --precision highest --out benchmarks/results_gpu_<device>_highest.md
    PYTHONPATH=. python benchmarks/gpu.py --parts solvers        # or --parts train
    python benchmarks/gpu.py --small                             # every size shrunk: a few minutes on 2 CPU cores

``--small``: dense B 16 d 64; conv B 4 at 16x16 with 8 and 16 channels; median of 3;
MDEQ-TINY at batch 8 on 16x16 images (2 pretraining layers, 6 solver steps each way); the
DEQ-Transformer at d_model 32, 2 heads, d_ff 64, batch 8 x 16 tokens. ``--no-torch`` leaves
out the torchdeq rows; without torch/torchdeq installed they are left out by themselves,
and the header says why. A failure on the torch side of a cell (or of one train step) is
printed in bold in place of its rows and the rest still runs. The script sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless set) so that JAX and torch share the GPU.

Precision. ``--precision default`` (the default) runs everything at each framework's own
default: JAX's default float32 matmul precision (``jax_default_matmul_precision`` None: TF32
for matmuls and convolutions on Ampere and newer NVIDIA GPUs such as the H200), and torch's
defaults (``torch.backends.cuda.matmul.allow_tf32`` False: full float32 matmuls;
``torch.backends.cudnn.allow_tf32`` True: TF32 convolutions). ``--precision highest`` sets
``jax_default_matmul_precision = "highest"`` and turns TF32 off in torch for both. The header
of the output says what was in effect. deq_jax's solvers compute their own small products
(norms, Broyden/Anderson coefficients) at full float32 either way; the solvers' and the train
configs' own ``precision`` options are left at None (follow the global setting). Everything
is float32 except the train steps' "bf16" rows (``model.compute_dtype = "bfloat16"``: the
cell in bfloat16, parameters and solver float32).

Part 1, solvers (``--parts solvers``), one table per cell, weights generated once in JAX by
benchmarks/problems.py (seed 0) and copied to torch (conv: NHWC/HWIO -> NCHW/OIHW; GroupNorm
over the same channel groups). Before the torch rows of each cell the script asserts, on the
CPU in float32, that the torch f and the JAX f agree on a random state (max |difference|
below 2e-5, printed):

* (a) dense tanh(zW + x U + b), B 256, d 1024, spectral norm 0.9;
* (b) the MDEQ-like conv cell, B 96, 24 channels, 32x32, GroupNorm 4 groups;
* (c) the same conv cell, B 128, 64 channels.

Solves: relative residual 1e-4 per example, at most 60 steps, z0 = 0; Broyden memory 20 and
Anderson memory 5 in both frameworks (torchdeq's Broyden ``LBFGS_thres``, its Anderson ``m``);
the same solver forward and backward (implicit differentiation; torchdeq ``ift=True``).
torchdeq stops a solve when the worst example of the batch meets tol (see
benchmarks/torchdeq_side.py); deq_jax stops each example on its own. Columns:

* f evals: evaluations of f on the batch in the forward solve; max rel: the largest
  per-example ||f(z) - z|| / ||f(z)|| at the returned z;
* fwd ms: one forward solve (median of --repeats after warm-up; JAX jitted, torch eager);
* overhead = fwd ms / (f evals x f ms), f ms being that framework's own time of one f:
  inside a jitted lax.while_loop for JAX (as in benchmarks/solvers.py), in a Python loop
  between two torch.cuda.synchronize() for torch (1.0 is the floor);
* bwd evals: VJPs of the backward (adjoint) solve; fwd+bwd ms: the gradient of mean(z*^2)
  with respect to the weights, solve included; fwd+bwd ratio = fwd+bwd ms /
  (f evals x f ms + (bwd evals + 1) x VJP ms), the VJP timed like f;
* Jacobian (1 Gaussian probe): deq_jax.hutchinson_frobenius (mean over the batch) and
  torchdeq.loss.jac_reg at each framework's own z*, the value, ms, and ms relative to one f
  call (JAX: one jitted f call; torch: one f call); then the same for its gradient with
  respect to the weights.

Part 2, train steps (``--parts train``), JAX only, through deq_jax.train
(``step.init_state``, ``make_train_step``): MDEQ-TINY (``deq_jax/configs/cifar_tiny.py``,
batch 96, random CIFAR-shaped images) and the DEQ-Transformer of ``lm_pydoc`` (its own
embedded text), each in five modes: pretraining (unrolled cell), DEQ without JR
(jr.gamma 0), DEQ with JR on every step (jr.prob 1; MDEQ-TINY has no JR of its own, so
jr.gamma 0.5 as its config suggests; jr.num_probes as each config says), and both DEQ
modes again with the cell in bfloat16. Columns: compile s
(lower + compile of the step); ms/step: median of --repeats steps after a warm-up step,
blocking after each; fwd / bwd nfe: the mean solver evaluations of those steps (the step's
own metrics); blocked / async: the time of --repeats steps blocking after each over the time
of as many steps dispatched back to back with one block at the end (> 1: asynchronous
dispatch hides the host's share of each step; about 1: the device is the bottleneck either
way); host done: when the back-to-back loop returned, as a fraction of its total time (well
under 1: the host ran ahead and did not wait on the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/gpu.py` without PYTHONPATH=.
    sys.path.insert(0, ROOT)
# JAX would otherwise take 75% of the GPU's memory up front and leave torch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MAX_STEPS = 60
TOL = 1e-4
MEMORY = {"broyden": 20, "anderson": 5}
# The torch cell must reproduce the JAX cell (outputs are O(1)) to this max abs difference on the CPU.
AGREEMENT = 2e-5


@dataclasses.dataclass(frozen=True)
class Sizes:
    problems: tuple  # (title, kind, keyword arguments of benchmarks/problems.<kind>)
    loop_n: dict  # f / VJP applications per baseline loop, by kind
    repeats: int
    mdeq: dict  # cifar_tiny overrides
    image_size: int
    lm: dict  # lm_pydoc overrides


FULL = Sizes(
    problems=(
        ("(a) dense B256 d1024", "dense", dict(spectral_norm=0.9, batch=256, width=1024)),
        ("(b) conv B96 24ch 32x32", "conv", dict(batch=96, size=32, channels=24, groups=4)),
        ("(c) conv B128 64ch 32x32", "conv", dict(batch=128, size=32, channels=64, groups=4)),
    ),
    loop_n={"dense": 100, "conv": 20},
    repeats=20,
    mdeq={"train": {"batch_size": 96}},
    image_size=32,
    lm={},
)
SMALL = Sizes(
    problems=(
        ("(a) dense B16 d64", "dense", dict(spectral_norm=0.9, batch=16, width=64)),
        ("(b) conv B4 8ch 16x16", "conv", dict(batch=4, size=16, channels=8, groups=4)),
        ("(c) conv B4 16ch 16x16", "conv", dict(batch=4, size=16, channels=16, groups=4)),
    ),
    loop_n={"dense": 20, "conv": 5},
    repeats=3,
    mdeq={"train": {"batch_size": 8, "pretrain_layers": 2}, "forward": {"max_steps": 6}, "backward": {"max_steps": 6}},
    image_size=16,
    lm={"model": {"d_model": 32, "num_heads": 2, "d_ff": 64}, "train": {"batch_size": 8, "seq_len": 16}},
)


class Report:
    """Prints each block as it comes and keeps it for ``--out``."""

    def __init__(self):
        self.blocks = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.blocks.append(text)

    def write(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write("\n".join(self.blocks) + "\n")


def median_ms(fn, repeats: int, sync, warmup: int = 2) -> float:
    """Median wall time of ``sync(fn())`` over ``repeats`` calls after ``warmup`` calls, in ms."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def import_torch_side():
    """benchmarks/torchdeq_side.py, or the reason it cannot be used."""
    try:
        from benchmarks import torchdeq_side
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken CUDA set-up)
        return None, f"{type(e).__name__}: {e}"
    return torchdeq_side, None


def header(report: Report, args, tds, torch_skip: str | None) -> None:
    import flax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    report(f"# deq_jax GPU benchmark ({'--small, ' if args.small else ''}precision {args.precision})\n")
    report(f"- device: {dev.device_kind} (platform {dev.platform}, {jax.device_count()} device(s))")
    report(f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")
    precision = jax.config.jax_default_matmul_precision
    meaning = "XLA's default: TF32 for float32 matmuls/convolutions on NVIDIA GPUs, full float32 on CPU"
    report(f"- JAX: jax_default_matmul_precision = {precision!r}" + (f" ({meaning})" if precision is None else ""))
    if tds is None:
        report(f"- torchdeq rows skipped: {torch_skip}")
    else:
        report(f"- {tds.versions()}, torch device {tds.device()}")
        report(f"- torch: {tds.configure(args.precision)}")
    report()


# --- part 1: solvers -------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    framework: str
    solver: str
    f_evals: int
    max_rel: float
    fwd_ms: float
    bwd_evals: int
    fwd_bwd_ms: float

    def cells(self, f_ms: float, vjp_ms: float) -> list:
        ideal = self.f_evals * f_ms + (self.bwd_evals + 1) * vjp_ms
        return [self.framework, self.solver, self.f_evals, f"{self.max_rel:.1e}", f"{self.fwd_ms:.2f}",
                f"{self.fwd_ms / (self.f_evals * f_ms):.2f}", self.bwd_evals, f"{self.fwd_bwd_ms:.2f}",
                f"{self.fwd_bwd_ms / ideal:.2f}"]


@dataclasses.dataclass
class Side:
    """One framework's results on one cell."""

    rows: list
    f_ms: float
    vjp_ms: float
    f_once_ms: float
    jac: float
    jac_ms: float
    jac_grad_ms: float


def jax_side(f, params, x, z0, kind: str, sizes: Sizes) -> Side:
    """deq_jax on one cell. Every jitted function takes the arrays as arguments (no large
    constants closed over)."""
    import jax
    import jax.numpy as jnp

    import deq_jax
    from benchmarks.solvers import _in_while_loop

    sync, n, r = jax.block_until_ready, sizes.loop_n[kind], sizes.repeats
    rows, z_star = [], None
    for solver, memory in MEMORY.items():
        options = {"memory": memory}
        solve = jax.jit(lambda p, x, z0, s=solver, o=options: deq_jax.solvers.get(s)(
            lambda z: f(p, x, z), z0, max_steps=MAX_STEPS, tol=TOL, **o))
        config = deq_jax.SolverConfig(solver, max_steps=MAX_STEPS, tol=TOL, options=options)

        def loss(p, x, z0, config=config):
            z, _ = deq_jax.fixed_point(f, p, x, z0, forward=config, backward=config)
            return jnp.mean(jnp.square(z))

        grad = jax.jit(jax.grad(loss))
        adjoint = jax.jit(lambda p, x, zs, g, c=config: deq_jax.adjoint_solve(f, p, x, zs, g, c))
        result = solve(params, x, z0)
        z_star = result.z if z_star is None else z_star
        _, stats = adjoint(params, x, result.z, 2.0 * result.z / result.z.size)  # the cotangent of mean(z^2)
        rows.append(Row("deq_jax", solver, int(result.f_evals), float(jnp.max(result.rel_residual)),
                        median_ms(lambda solve=solve: solve(params, x, z0), r, sync), int(stats.f_evals),
                        median_ms(lambda grad=grad: grad(params, x, z0), r, sync)))

    f_loop = jax.jit(lambda p, x, z: _in_while_loop(lambda z: f(p, x, z), n)(z))

    def vjp_loop(p, x, zs, g):
        _, vjp = jax.vjp(lambda z: f(p, x, z), zs)
        return _in_while_loop(lambda u: vjp(u)[0] + g, n)(g)

    def jac_mean(p, x, zs):
        return jnp.mean(deq_jax.hutchinson_frobenius(lambda z: f(p, x, z), zs, jax.random.PRNGKey(0)))

    vjp_loop, f_once, jac, jac_grad = jax.jit(vjp_loop), jax.jit(f), jax.jit(jac_mean), jax.jit(jax.grad(jac_mean))
    g = 2.0 * z_star / z_star.size
    return Side(
        rows,
        f_ms=median_ms(lambda: f_loop(params, x, z0), r, sync) / n,
        vjp_ms=median_ms(lambda: vjp_loop(params, x, z_star, g), r, sync) / n,
        f_once_ms=median_ms(lambda: f_once(params, x, z_star), r, sync),
        jac=float(jac(params, x, z_star)),
        jac_ms=median_ms(lambda: jac(params, x, z_star), r, sync),
        jac_grad_ms=median_ms(lambda: jac_grad(params, x, z_star), r, sync),
    )


def torch_side(tds, params_np, x_np, z0_np, kind: str, groups: int, sizes: Sizes) -> Side:
    problem = tds.Problem(kind, params_np, x_np, z0_np, groups)
    sync, n, r = tds.sync, sizes.loop_n[kind], sizes.repeats
    rows, z_star = [], None
    for solver, memory in MEMORY.items():
        deq = problem.deq(solver, memory, MAX_STEPS, TOL)
        solve, fwd_bwd = problem.solve(deq), problem.fwd_bwd(deq)
        z, f_evals, _ = problem.counted(solve)
        _, _, bwd_evals = problem.counted(fwd_bwd)
        z_star = z if z_star is None else z_star
        rows.append(Row("torchdeq", solver, f_evals, float(tds.rel_residual(problem.f, z).max()),
                        median_ms(solve, r, sync), bwd_evals, median_ms(fwd_bwd, r, sync)))
    return Side(
        rows,
        f_ms=median_ms(problem.f_loop(n), r, sync) / n,
        vjp_ms=median_ms(problem.vjp_loop(z_star, n), r, sync) / n,
        f_once_ms=median_ms(problem.f_once(z_star), r, sync),
        jac=float(problem.jac(z_star)()),
        jac_ms=median_ms(problem.jac(z_star), r, sync),
        jac_grad_ms=median_ms(problem.jac_grad(z_star), r, sync),
    )


def check_f_agreement(tds, f, params, x, kind: str, groups: int, examples: int = 4) -> float:
    """Max |f_torch(z) - f_jax(z)| on the CPU, in float32, at a random z of the first examples."""
    import jax
    import numpy as np

    cpu = jax.devices("cpu")[0]
    x = np.asarray(x)[:examples]
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), x.shape), np.float32)
    with jax.default_device(cpu):
        args = jax.device_put((params, x, z), cpu)
        fz_jax = np.asarray(jax.jit(f)(*args))
    fz_torch = tds.Problem(kind, jax.tree.map(np.asarray, params), x, z, groups, dev="cpu").f_on(z)
    return float(np.max(np.abs(fz_jax - fz_torch)))


def torchdeq_side_or_none(report: Report, tds, f, params, x, z0, kind: str, groups: int, sizes: Sizes):
    """The torchdeq results on one cell, after asserting that its f is the JAX f; None (and
    the reason, reported) if that fails, so that one torch failure never loses the JAX rows
    of a one-shot GPU run."""
    import jax
    import numpy as np

    try:
        diff = check_f_agreement(tds, f, params, x, kind, groups)
        report(f"torch f vs JAX f on the CPU (float32, random z, 4 examples): max |difference| = {diff:.1e} "
               f"(asserted < {AGREEMENT:g})\n")
        assert diff < AGREEMENT, f"the torch cell does not compute the JAX cell: max |difference| {diff:.2e}"
        params_np = jax.tree.map(np.asarray, params)
        return torch_side(tds, params_np, np.asarray(x), np.asarray(z0), kind, groups, sizes)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report(f"**torchdeq rows failed: {type(e).__name__}: {e}**\n")
        return None


def solver_tables(sides: dict) -> str:
    from benchmarks.solvers import _table

    rows = [row.cells(s.f_ms, s.vjp_ms) for s in sides.values() for row in s.rows]
    solves = _table(["framework", "solver", "f evals", "max rel", "fwd ms", "overhead", "bwd evals", "fwd+bwd ms",
                     "fwd+bwd ratio"], rows)
    baselines = _table(["framework", "f ms (loop)", "VJP ms (loop)", "f ms (one call)"],
                       [[k, f"{s.f_ms:.3f}", f"{s.vjp_ms:.3f}", f"{s.f_once_ms:.3f}"] for k, s in sides.items()])
    jacobian = _table(
        ["Jacobian (1 probe)", "value", "ms", "/ f call", "gradient ms", "/ f call"],
        [[k, f"{s.jac:.3e}", f"{s.jac_ms:.2f}", f"{s.jac_ms / s.f_once_ms:.1f}", f"{s.jac_grad_ms:.2f}",
          f"{s.jac_grad_ms / s.f_once_ms:.1f}"] for k, s in sides.items()],
    )
    return "\n\n".join([solves, baselines, jacobian]) + "\n"


def run_solvers(report: Report, sizes: Sizes, tds) -> None:
    from benchmarks import problems

    report(f"## Solvers: rel. residual {TOL:g} per example, at most {MAX_STEPS} steps, float32, "
           f"Broyden memory {MEMORY['broyden']}, Anderson memory {MEMORY['anderson']}; median of {sizes.repeats}\n")
    for title, kind, kwargs in sizes.problems:
        start = time.perf_counter()
        f, params, x, z0 = getattr(problems, kind)(**kwargs)
        groups = kwargs.get("groups", 4)
        report(f"### {title}\n")
        sides = {"deq_jax": jax_side(f, params, x, z0, kind, sizes)}
        if tds is not None:
            torch_results = torchdeq_side_or_none(report, tds, f, params, x, z0, kind, groups, sizes)
            if torch_results is not None:
                sides["torchdeq"] = torch_results
        report(solver_tables(sides))
        if tds is None:
            report("(torchdeq rows skipped: see the header)\n")
        report(f"({time.perf_counter() - start:.0f} s)\n")


# --- part 2: train steps ---------------------------------------------------------------


def _merge(c, overrides: dict):
    for group, values in overrides.items():
        c[group].update(values)
    return c


def train_modes(jr_gamma: float):
    """(name, step mode, config overrides) of the modes: three in float32, and the DEQ ones
    again with the cell in bfloat16 (``model.compute_dtype``; parameters and solver float32)."""
    no_jr, jr = {"gamma": 0.0, "prob": 0.0}, {"gamma": jr_gamma, "prob": 1.0}
    bf16 = {"compute_dtype": "bfloat16"}
    return (
        ("pretrain", "unrolled", {}),
        ("deq", "deq", {"jr": no_jr}),
        ("deq+jr", "deq", {"jr": jr}),
        ("deq bf16", "deq", {"jr": no_jr, "model": bf16}),
        ("deq+jr bf16", "deq", {"jr": jr, "model": bf16}),
    )


def mdeq_setup(c, image_size: int, n_batches: int):
    """MDEQ-TINY with random CIFAR-shaped batches (the CIFAR-10 files are not needed)."""
    import numpy as np

    from deq_jax.models import MDEQ
    from deq_jax.train.tasks import cell_compute_dtype

    model = MDEQ(c.model.size, num_classes=10, dropout=c.model.dropout, compute_dtype=cell_compute_dtype(c))
    rng = np.random.default_rng(0)
    shape = (c.train.batch_size, image_size, image_size, 3)
    batches = [(rng.standard_normal(shape, np.float32), rng.integers(0, 10, c.train.batch_size).astype(np.int32))
               for _ in range(n_batches)]
    return model, np.zeros((1,) + shape[1:], np.float32), batches


def lm_setup(c, n_batches: int):
    """The DEQ-Transformer of the config on its own data (deq_jax.train.make_task)."""
    from deq_jax.train import make_task

    task = make_task(c)
    return task.model, task.sample_input, [task.train_batch(s) for s in range(n_batches)]


def time_train_step(c, mode: str, setup, repeats: int) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from deq_jax.train import step as step_lib
    from deq_jax.train.optim import make_optimizer

    mesh = step_lib.make_mesh()
    model, sample, batches = setup
    data = NamedSharding(mesh, P(step_lib.DATA))
    batches = [jax.device_put(b, data) for b in batches]
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(model, c, tx, sample, mesh)
    # JR on every step of a mode whose JR weight is > 0 (train_modes sets jr.prob 1 there).
    step = step_lib.make_train_step(model, c, tx, lr, mesh, mode, jr=step_lib.jr_weight_enabled(c, mode))
    start = time.perf_counter()
    compiled = step.lower(state, *batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, *batches[0])  # warm up
    jax.block_until_ready((state, metrics))

    times, history = [], []
    for i in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, *batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        history.append(metrics)
    start = time.perf_counter()
    for i in range(repeats):
        state, metrics = compiled(state, *batches[i % len(batches)])
    host_s = time.perf_counter() - start
    jax.block_until_ready((state, metrics))
    async_s = time.perf_counter() - start
    history = jax.device_get(history)
    mean = lambda key: float(np.mean([h[key] for h in history]))  # noqa: E731
    return {"compile_s": compile_s, "ms": 1e3 * statistics.median(times), "fwd_nfe": mean("fwd_nfe"),
            "bwd_nfe": mean("bwd_nfe"), "jr_applied": mean("jr_applied"), "blocked_over_async": sum(times) / async_s,
            "host_done": host_s / async_s}


def train_row(title: str, module, overrides: dict, mode_overrides: dict, name: str, mode: str, setup,
              repeats: int) -> list:
    """One table row: a mode's step timed, or the error it raised (a one-shot GPU run goes on)."""
    from deq_jax.train import config as config_lib

    c = config_lib.resolve(_merge(_merge(module.get_config(), overrides), mode_overrides))
    shape = f"{c.train.batch_size}" + (f" x {c.train.seq_len}" if c.data.name != "cifar10" else "")
    if name.startswith("deq+jr"):
        name += f" (gamma {c.jr.gamma:g})"
    try:
        r = time_train_step(c, mode, setup(c), repeats)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return [title, name, shape, f"**failed: {type(e).__name__}: {e}**", "", "", "", ""]
    print(f"  {title} {name}: {r['ms']:.2f} ms/step", flush=True)
    nfe = "-" if mode == "unrolled" else f"{r['fwd_nfe']:.1f} / {r['bwd_nfe']:.1f}"
    if name.startswith("deq+jr") and r["jr_applied"] < 1:
        name += f", JR on {r['jr_applied']:.0%} of the steps"
    return [title, name, shape, f"{r['compile_s']:.1f}", f"{r['ms']:.2f}", nfe, f"{r['blocked_over_async']:.2f}",
            f"{r['host_done']:.2f}"]


def run_train(report: Report, sizes: Sizes) -> None:
    from benchmarks.solvers import _table
    from deq_jax.configs import cifar_tiny, lm_pydoc

    models = (
        ("MDEQ-TINY (cifar_tiny)", cifar_tiny, sizes.mdeq, lambda c: mdeq_setup(c, sizes.image_size, 4)),
        ("DEQ-Transformer (lm_pydoc)", lm_pydoc, sizes.lm, lambda c: lm_setup(c, 4)),
    )
    rows, walls = [], []
    for title, module, overrides, setup in models:
        start = time.perf_counter()
        jr_gamma = module.get_config().jr.gamma or 0.5  # cifar_tiny has no JR: 0.5, as its docstring suggests
        for name, mode, mode_overrides in train_modes(jr_gamma):
            rows.append(train_row(title, module, overrides, mode_overrides, name, mode, setup, sizes.repeats))
        walls.append(f"{title} {time.perf_counter() - start:.0f} s")
    report(f"## Train steps (deq_jax.train, JAX only; median of {sizes.repeats} steps)\n")
    report(_table(["model", "step", "batch", "compile s", "ms/step", "fwd / bwd nfe", "blocked / async",
                   "host done"], rows) + "\n")
    report(f"({', '.join(walls)})\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("default", "highest"), default="default")
    parser.add_argument("--small", action="store_true", help="every problem shrunk (CPU test run)")
    parser.add_argument("--parts", default="solvers,train", help="solvers, train or both")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (default 20; --small 3)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torchdeq rows")
    parser.add_argument("--out", default=None, help="also write the markdown output to this file")
    args = parser.parse_args(argv)

    import jax

    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    sizes = SMALL if args.small else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    jax.devices()  # JAX's backend (and its CUDA libraries) first, then torch's
    tds, torch_skip = (None, "--no-torch") if args.no_torch else import_torch_side()

    report = Report()
    start = time.perf_counter()
    header(report, args, tds, torch_skip)
    parts = args.parts.split(",")
    if "solvers" in parts:
        run_solvers(report, sizes, tds)
    if "train" in parts:
        run_train(report, sizes)
    report(f"Total {time.perf_counter() - start:.0f} s.")
    if args.out:
        report.write(args.out)


if __name__ == "__main__":
    main()
