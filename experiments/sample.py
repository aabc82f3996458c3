"""Sample text from a trained DEQ-Transformer run (thin entry point; see deq_jax.train.sampling).

    python -m experiments.sample runs/lm_pydoc --prompt "The " --length 300 --temperature 0.8 --seed 0

The same run, prompt, length, temperature and seed always give the same text.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("prompt", "The ", "Text to continue (characters or words of the run's vocabulary).")
flags.DEFINE_integer("length", 300, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = most likely token.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.sample RUN_DIR [--prompt ...]")
    logging.set_verbosity(logging.WARNING)
    from deq_jax.train.sampling import generate, load_run

    try:  # the user's mistakes (no run folder, a prompt outside the vocabulary): one line, status 2
        c, task, params, step = load_run(argv[1], FLAGS.step)
        text = generate(
            task, params, c, FLAGS.prompt, length=FLAGS.length, temperature=FLAGS.temperature, seed=FLAGS.seed
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"sample: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"[{task.name}, checkpoint step {step}, temperature {FLAGS.temperature}, seed {FLAGS.seed}]")
    print(FLAGS.prompt + text)


if __name__ == "__main__":
    sys.exit(app.run(main))
