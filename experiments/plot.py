"""Plot one or more run folders, overlaid: ``python -m experiments.plot RUN_DIR [RUN_DIR ...]``.

Writes ``training.png`` (loss, test accuracy, forward/backward steps, residual, Jacobian
norm, gamma over training) and ``budgets.png`` (final test accuracy and residual against
the forward step budget) into ``--out`` (default: the first run's ``plots/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deq_jax.train.plots import plot_runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots of the first run)")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.run_dirs[0]) / "plots")
    for path in plot_runs(args.run_dirs, out):
        print(path)


if __name__ == "__main__":
    main()
