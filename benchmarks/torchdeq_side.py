"""The torchdeq side of benchmarks/gpu.py: the benchmark cells of benchmarks/problems.py
written in PyTorch, with the same weights, solved with torchdeq 0.1.0.

Everything here returns plain callables; benchmarks/gpu.py times them exactly as it times
the JAX ones. Layouts: the dense cell is the same ``[B, d]`` in both; the conv cell is
NHWC / HWIO in JAX and NCHW / OIHW here (:func:`to_torch_layout` converts states and
inputs, :func:`to_torch` the weights).

torchdeq 0.1.0's solvers (``torchdeq/solver/broyden.py``, ``anderson.py``) compute per-example
residuals ``||f(z) - z||`` and ``||f(z) - z|| / (||f(z)|| + 1e-9)``, but stop on the *whole
batch*: the loop ends when the largest per-example residual of the current iterate is below
``tol`` (``trace_dict[stop_mode][-1].max() < tol``), and until then every example keeps being
updated (there is no per-example freezing). Each example gets back its own lowest-residual
iterate. Broyden also stops after 30 steps without progress near tol. deq_jax stops each
example separately, but its batched loop, too, runs until the slowest example stops.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch
import torch.nn.functional as F
import torchdeq
from torchdeq.solver import get_solver, register_solver

# How many times each registered solver called the function it was given in the last run:
# the forward solver calls f, the backward (IFT) solver calls z -> VJP(z) + g.
COUNTS = {"fwd": 0, "bwd": 0}


def versions() -> str:
    return f"torch {torch.__version__}, torchdeq {importlib.metadata.version('torchdeq')}"


def configure(precision: str) -> str:
    """Sets torch's float32 matmul/conv precision (``highest``: no TF32 anywhere; ``default``:
    torch's own defaults) and says what is in effect. Without a GPU (test runs) torch gets one
    CPU thread: on a small shared machine its OpenMP threads' spin-waiting made timings erratic
    (one f call 0.02 ms or 30 ms from run to run)."""
    if precision == "highest":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return (
        f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (convolutions), "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}, "
        f"CPU threads {torch.get_num_threads()}"
    )


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(_=None) -> None:
    """Waits for the GPU (the torch analogue of jax.block_until_ready)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def to_torch_layout(kind: str, a: np.ndarray, dev) -> torch.Tensor:
    """A JAX state or input as a torch tensor: NHWC -> NCHW for the conv cell."""
    a = np.array(a, np.float32)  # a writable copy
    if kind == "conv":
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dev)


def from_torch_layout(kind: str, t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.transpose(0, 2, 3, 1) if kind == "conv" else a


def to_torch(kind: str, params, dev) -> list[torch.Tensor]:
    """The JAX parameters (numpy pytree) as a flat list of leaf tensors that require grad:
    dense ``[w, u, b]``; conv ``[w1, w2, s1, b1, s2, b2, s3, b3]`` with HWIO -> OIHW."""
    if kind == "dense":
        arrays = [params["w"], params["u"], params["b"]]
    else:
        hwio_to_oihw = lambda w: np.asarray(w).transpose(3, 2, 0, 1)  # noqa: E731
        arrays = [hwio_to_oihw(params["w1"]), hwio_to_oihw(params["w2"])]
        arrays += [np.asarray(a) for pair in params["gn"] for a in pair]
    return [torch.from_numpy(np.array(a, np.float32)).to(dev).requires_grad_() for a in arrays]


def make_f(kind: str, params: list[torch.Tensor], x: torch.Tensor, groups: int = 4):
    """``z -> f(z)``: the same cell as benchmarks/problems.py ``dense`` / ``conv``."""
    if kind == "dense":
        w, u, b = params

        def f(z):
            return torch.tanh(z @ w + x @ u + b)

        return f
    w1, w2, s1, b1, s2, b2, s3, b3 = params

    def f(z):
        h = F.relu(F.group_norm(F.conv2d(z, w1, padding=1), groups, s1, b1, eps=1e-5))
        h = F.group_norm(F.conv2d(h, w2, padding=1), groups, s2, b2, eps=1e-5)
        return F.group_norm(F.relu(z + h + x), groups, s3, b3, eps=1e-5)

    return f


def _register(solver: str, memory: int) -> tuple[str, str]:
    """Registers torchdeq's own ``solver`` twice, with ``memory`` set (Broyden: LBFGS_thres,
    whose default is max_iter; Anderson: m, default 6) and counting the calls of its function
    into COUNTS["fwd"] / COUNTS["bwd"]. get_deq passes the backward solver only max_iter, tol
    and stop_mode, so the memory has to be bound here. Returns the two names."""
    base = get_solver(solver)
    option = {"broyden": "LBFGS_thres", "anderson": "m"}[solver]
    names = []
    for role in ("fwd", "bwd"):

        def counted_solver(func, x0, role=role, **kwargs):
            def counted(z):
                COUNTS[role] += 1
                return func(z)

            return base(counted, x0, **{option: memory, **kwargs})

        name = f"bench_{role}_{solver}_{memory}"
        register_solver(name, counted_solver)
        names.append(name)
    return names[0], names[1]


def rel_residual(f, z: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``||f(z) - z|| / ||f(z)||`` (the same norms as deq_jax's)."""
    with torch.no_grad():
        fz = f(z)
        b = z.shape[0]
        return (fz - z).reshape(b, -1).norm(dim=1) / (fz.reshape(b, -1).norm(dim=1) + 1e-8)


class Problem:
    """One benchmark cell on the torch side; its methods return zero-argument callables."""

    def __init__(self, kind: str, params_np, x_np, z0_np, groups: int = 4, dev=None):
        self.kind = kind
        self.dev = device() if dev is None else dev
        self.params = to_torch(kind, params_np, self.dev)
        self.x = to_torch_layout(kind, x_np, self.dev)
        self.z0 = to_torch_layout(kind, z0_np, self.dev)
        self.f = make_f(kind, self.params, self.x, groups)

    def f_on(self, z_np: np.ndarray) -> np.ndarray:
        """f at a JAX-layout state, back in JAX layout (for the agreement check)."""
        with torch.no_grad():
            return from_torch_layout(self.kind, self.f(to_torch_layout(self.kind, z_np, self.dev)))

    def deq(self, solver: str, memory: int, max_steps: int, tol: float):
        """torchdeq's DEQ module (core 'sliced', the default) with the implicit backward (ift=True;
        without it get_deq's default is a 1-step phantom gradient), relative stop both ways."""
        f_name, b_name = _register(solver, memory)
        return torchdeq.get_deq(
            f_solver=f_name, f_max_iter=max_steps, f_tol=tol, f_stop_mode="rel",
            b_solver=b_name, b_max_iter=max_steps, b_tol=tol, b_stop_mode="rel",
            ift=True,
        )

    def solve(self, deq):
        """The forward solve alone (eval mode: no graph, no extra f call)."""

        def run():
            deq.eval()
            with torch.no_grad():
                z_out, _ = deq(self.f, self.z0)
            return z_out[-1]

        return run

    def fwd_bwd(self, deq):
        """Gradient of mean(z*^2) with respect to the parameters (train mode: the solve, one
        f call with a graph at z*, and the IFT backward solve)."""

        def run():
            deq.train()
            z_out, _ = deq(self.f, self.z0)
            loss = torch.mean(torch.square(z_out[-1]))
            return torch.autograd.grad(loss, self.params)

        return run

    def counted(self, run):
        """Runs ``run`` once and returns (its output, forward solver f calls, backward VJPs)."""
        COUNTS.update(fwd=0, bwd=0)
        out = run()
        sync()
        return out, COUNTS["fwd"], COUNTS["bwd"]

    def f_loop(self, n: int):
        """f applied n times in a Python loop (no graph)."""

        def run():
            with torch.no_grad():
                z = self.z0
                for _ in range(n):
                    z = self.f(z)
            return z

        return run

    def vjp_loop(self, z_star: torch.Tensor, n: int):
        """u -> VJP_z(f)(u) + g applied n times, as in torchdeq's backward solve (one graph of f
        at z*, retained)."""
        z = z_star.detach().requires_grad_()
        with torch.enable_grad():
            fz = self.f(z)
        g = 2.0 * z_star.detach() / z_star.numel()

        def run():
            u = g
            for _ in range(n):
                u = torch.autograd.grad(fz, z, u, retain_graph=True)[0] + g
            return u

        return run

    def f_once(self, z_star: torch.Tensor):
        def run():
            with torch.no_grad():
                return self.f(z_star)

        return run

    def jac(self, z_star: torch.Tensor):
        """torchdeq.loss.jac_reg (1 Gaussian probe: ||v^T J||^2 / numel) at z*, no graph. jac_reg
        draws its probe on the CPU and copies it to the device (``torch.randn(...).to(z0)``);
        that is part of its cost."""

        def run():
            z = z_star.detach().requires_grad_()
            return torchdeq.loss.jac_reg(self.f(z), z, vecs=1, create_graph=False)

        return run

    def jac_grad(self, z_star: torch.Tensor):
        """The gradient of jac_reg at z* with respect to the parameters (the last GroupNorm
        bias of the conv cell does not enter J: its gradient is None)."""

        def run():
            z = z_star.detach().requires_grad_()
            loss = torchdeq.loss.jac_reg(self.f(z), z, vecs=1, create_graph=True)
            return torch.autograd.grad(loss, self.params, allow_unused=True)

        return run
