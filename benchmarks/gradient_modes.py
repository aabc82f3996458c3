"""One training step in each gradient mode: time, function evaluations and memory.

    python benchmarks/gradient_modes.py                  # digits and pydoc (~5 min on 2 cores)
    python benchmarks/gradient_modes.py --configs digits --repeats 10

The DEQ train step of a config (``digits``: the Quickstart MDEQ; ``pydoc``: the
DEQ-Transformer) in the modes ``docs/results.md`` compares, each solve run to its limit
(``early_exit`` False, no random lowering: the most a step of the mode costs):

* implicit DEQ without the JR term (the first row, the unit of the ratios);
* implicit DEQ with the JR term (a JR run applies it on a fraction ``jr.prob`` of its steps);
* implicit DEQ with fixed-point correction (3 states, no JR term);
* RevDEQ: the reversible iteration with its exact reverse-pass gradient, beta 0.5, at the
  forward budget of the same f evaluations (half the steps: two f evaluations a step).

Columns as in ``benchmarks/jr_cost.py``'s train-step table; ``XLA temp MB`` is the
temporary memory of the compiled step (its working memory beyond parameters and batch).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if ROOT not in sys.path:  # `python benchmarks/gradient_modes.py` without PYTHONPATH=.
        sys.path.insert(0, ROOT)
    import deq_jax.train.cpu_flags as cpu_flags

    cpu_flags.apply()  # the flags the training entry points use, before jax starts

import jax  # noqa: E402

from benchmarks.jr_cost import STEP_HEADER, step_rows  # noqa: E402
from benchmarks.solvers import _table  # noqa: E402


def settings(name: str):
    """The modes of config ``name``: (label, JR term, overrides)."""
    from benchmarks.jr_cost import step_config

    limit = step_config(name).forward.max_steps
    reversible = {"forward": {"solver": "reversible", "beta": 0.5, "max_steps": limit // 2},
                  "backward": {"mode": "reversible"}}
    return (("implicit, no JR", False, {}),
            ("implicit + JR term", True, {}),
            ("implicit + FPC (3 states)", False, {"correction": {"n_states": 3}}),
            (f"RevDEQ (beta 0.5, {limit // 2} steps)", False, reversible))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="digits,pydoc")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of 4 steps per mode")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}\n")
    rows = [row for name in args.configs.split(",") if name for row in step_rows(name, args.repeats, settings(name))]
    print(_table(STEP_HEADER, rows))


if __name__ == "__main__":
    main()
