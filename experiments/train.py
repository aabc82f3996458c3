"""Train a DEQ with Jacobian regularization (thin entry point; the work is in deq_jax.train).

    python -m experiments.train                                  # digits default, with JR
    python -m experiments.train --config=experiments/configs/cifar_tiny.py \
        --config.data.data_dir=~/tensorflow_datasets --workdir=runs/cifar_tiny
    python -m experiments.train --config=experiments/configs/lm_pydoc.py  # DEQ-Transformer, text
    python -m experiments.train --workdir=runs/digits --resume  # continue a run

Unknown ``--config.*`` keys are errors. Prints where the run folder and plots are.
"""

from __future__ import annotations

import os
import sys
import time

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: faster CPU code, same math

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>_<date-time>).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def _default_workdir() -> str:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    return os.path.join("runs", f"{name}_{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "no TPU") are noise here
    config = FLAGS.config
    if config.multihost:
        import jax

        jax.distributed.initialize()

    from deq_jax.train import train
    from deq_jax.train.loop import describe

    if FLAGS.resume and not FLAGS.workdir:
        raise app.UsageError("--resume needs --workdir, the run folder to continue")
    workdir = FLAGS.workdir or _default_workdir()
    summary = train(config, workdir, resume=FLAGS.resume, progress=FLAGS.progress)
    print(f"\nrun folder: {summary['run_dir']}")
    print(f"plots:      {', '.join(summary.get('plots', []))}")
    print(describe(summary))


if __name__ == "__main__":
    sys.exit(app.run(main))
