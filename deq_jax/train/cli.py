"""The training command: ``deq-jax-train`` (installed) or ``python -m experiments.train``
(from a checkout). Thin: the work is in :func:`deq_jax.train.train`.

Usage (also what ``deq-jax-train --help`` prints, with the flags)::

    deq-jax-train                                           # digits default, with JR
    deq-jax-train --config=deq_jax/configs/cifar_tiny.py \\
        --config.data.data_dir=~/tensorflow_datasets --workdir=runs/cifar_tiny
    deq-jax-train --config=deq_jax/configs/lm_pydoc.py      # DEQ-Transformer, text
    deq-jax-train --workdir=runs/digits --resume            # continue a run
    deq-jax-train --coordinator_address=10.0.0.1:4321 --num_processes=2 --process_id=0 \
        --workdir=/shared/runs/digits                       # process 0 of 2, started by hand
    deq-jax-train --config.multihost=True --workdir=...     # a cluster JAX detects (SLURM, TPU)

``--config`` is an ``ml_collections`` config file; the default is ``digits.py`` in
:mod:`deq_jax.configs`. Unknown ``--config.*`` keys are errors. Prints where the run folder
and plots are. ``--help`` exits with status 0 (absl's own exits with 1).

Importing this module defines the absl flags and changes nothing else. :func:`main` first
sets the XLA CPU flags (:func:`deq_jax.train.cpu_flags.apply`): after the flags are parsed,
before jax's backend starts (so ``--help`` and a bad flag answer without starting jax).
"""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from deq_jax.train import cpu_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
_FLAG_NAMES = ("config", "workdir", "resume", "progress", "coordinator_address", "num_processes", "process_id")

try:  # ml_collections reads sys.argv's --config.* overrides here, at import: a typo fails now
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file.", lock_config=True)
    _CONFIG_ERROR = None
except (AttributeError, KeyError) as e:  # reported by run() as a usage error
    _CONFIG_ERROR = e
flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>_<date-time>).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 in a multi-process run started by hand (with --num_processes and "
                    "--process_id); without them, --config.multihost=True uses JAX's cluster detection.")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run started by hand.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
FLAGS = flags.FLAGS


def _default_workdir() -> str:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    return os.path.join("runs", f"{name}_{time.strftime('%Y%m%d-%H%M%S')}")


def resume_command(argv: list[str], workdir: str) -> str:
    """The command line that continues the run of ``argv`` (this command's) in ``workdir``."""
    import shlex

    program = argv[0]
    if program.endswith(os.path.join("experiments", "train.py")):
        head = ["python3", "-m", "experiments.train"]
    elif os.path.basename(program) == "deq-jax-train":
        head = ["deq-jax-train"]
    else:
        head = ["python3", program]
    keep, args = [], iter(argv[1:])
    for a in args:
        if a in ("--workdir", "-workdir"):
            next(args, None)  # its value
        elif not a.lstrip("-").startswith(("workdir=", "resume", "noresume")):
            keep.append(a)
    return shlex.join(head + keep + [f"--workdir={workdir}", "--resume"])


def main(argv):
    """The absl main: trains ``--config`` into ``--workdir`` and prints where the results are."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cpu_flags.apply()  # before jax's backend starts: faster CPU code, same math
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "no TPU") are noise here
    config = FLAGS.config
    by_hand = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if config.multihost or any(v is not None for v in by_hand):
        from deq_jax.train import distributed

        try:
            distributed.initialize(*by_hand)
        except ValueError as e:
            raise app.UsageError(str(e)) from None

    from deq_jax.train.loop import describe, train
    from deq_jax.train.preemption import Interrupted

    workdir = FLAGS.workdir or _default_workdir()
    try:
        summary = train(config, workdir, resume=FLAGS.resume, progress=FLAGS.progress)
    except Interrupted as stop:
        print(f"\n{stop.signal_name}: stopped after step {stop.step}, its checkpoint written; resume with:\n"
              f"  {resume_command(sys.argv, workdir)}", flush=True)
        sys.exit(stop.exit_code)
    print(f"\nrun folder: {summary['run_dir']}")
    print(f"plots:      {', '.join(summary.get('plots', []))}")
    print(describe(summary))


_HELP = {"-?": False, "-help": False, "--help": False, "-helpshort": False, "--helpshort": False,
         "-helpfull": True, "--helpfull": True}  # absl's help flags -> whether to list every flag


def _help(full: bool) -> None:
    """Prints the usage (the main script's docstring, else this module's) and the flags."""
    print((sys.modules["__main__"].__doc__ or __doc__).rstrip() + "\n\nflags:")
    print(FLAGS.get_help() if full else FLAGS.main_module_help())
    if not full:
        print("\nTry --helpfull to get a list of all flags.")


def run() -> None:
    """Runs the training command with ``sys.argv`` (the ``deq-jax-train`` console script)."""
    if _CONFIG_ERROR is not None:
        overrides = ", ".join(a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config."))
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(_CONFIG_ERROR))
        usage_error(f"unknown config key in {overrides}" + (f': did you mean "{hint[1]}" instead of "{hint[2]}"?'
                                                             if hint else ""))
    # absl's --help lists the main script's flags; these are defined here, not there.
    for name in _FLAG_NAMES:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    args = sys.argv[1:]
    args = args[: args.index("--")] if "--" in args else args
    asked = [_HELP[a] for a in args if a in _HELP]
    if asked:  # answered here: absl's help flags exit with status 1
        _help(full=any(asked))
        sys.exit(0)
    try:  # a usage error is one line and exit status 2, as command-line tools do; a traceback means a bug
        remaining = FLAGS(sys.argv)
        if FLAGS.resume and not FLAGS.workdir:
            raise ValueError("--resume needs --workdir, the run folder to continue")
        from deq_jax.train.config import resolve

        resolve(FLAGS.config)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        usage_error(str(e))
    # Parsed once, here: parsing again would define ml_collections' --config.* override flags twice.
    app.run(main, flags_parser=lambda _: remaining)


def usage_error(message: str) -> None:
    """Prints ``<command>: error: <message>`` on one line and exits with status 2."""
    text = str(message).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line for line in lines]
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(lines)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    run()
