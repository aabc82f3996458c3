"""Train a DEQ with Jacobian regularization (a shim: the command is deq_jax.train.cli, also
installed as ``deq-jax-train``).

    python -m experiments.train                                  # digits default, with JR
    python -m experiments.train --config=deq_jax/configs/cifar_tiny.py \\
        --config.data.data_dir=~/tensorflow_datasets --workdir=runs/cifar_tiny
    python -m experiments.train --config=deq_jax/configs/lm_pydoc.py  # DEQ-Transformer, text
    python -m experiments.train --workdir=runs/digits --resume  # continue a run

Unknown ``--config.*`` keys are errors. Prints where the run folder and plots are.
"""

from deq_jax.train import cli

if __name__ == "__main__":
    cli.run()
