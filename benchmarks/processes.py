"""Host data time and throughput of the digits training job on 1 process and on 2.

    python benchmarks/processes.py [--steps 200] [--devices 2]

Runs the Quickstart config (no pretraining phase: every step a DEQ step with the JR coin)
for ``--steps`` steps twice with the same ``--devices`` CPU devices in all: once as one
process holding them all, once as two processes (``jax.distributed`` on 127.0.0.1, gloo
collectives) holding half each. Prints, from each run's ``metrics.jsonl`` (compilation
excluded; the first logged interval dropped as warm-up), the host time per step spent on
the batch (``data_time``: each process loads, augments and sends only its rows), the step
time and examples per second.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(run_dir: Path, processes: int, devices: int, steps: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // processes}")
    overrides = [f"--config.train.num_steps={steps}", "--config.train.pretrain_steps=0",
                 "--config.train.log_every=20", f"--config.train.eval_every={steps}",
                 f"--config.train.checkpoint_every={steps}", "--config.eval.budgets=12", "--noprogress"]
    procs = []
    for i in range(processes):
        args = [sys.executable, "-m", "experiments.train", f"--workdir={run_dir}", *overrides]
        if processes > 1:
            args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        out = p.communicate(timeout=1800)[0]
        if p.returncode:
            raise RuntimeError(out[-3000:])


def _means(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][1:]  # the first interval warms up
    return {k: sum(r[k] for r in train) / len(train) for k in ("data_time", "step_time", "examples_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=2, help="CPU devices in all (even)")
    args = parser.parse_args()
    print(f"digits config, {args.steps} steps, {args.devices} CPU devices in all, batch 32\n")
    print("| processes x devices | data time per step (ms) | step time (ms) | examples/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            run_dir = Path(tmp) / f"p{processes}"
            _run(run_dir, processes, args.devices, args.steps)
            m = _means(run_dir)
            print(f"| {processes} x {args.devices // processes} | {1e3 * m['data_time']:.2f} | "
                  f"{1e3 * m['step_time']:.1f} | {m['examples_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
