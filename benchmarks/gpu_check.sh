#!/usr/bin/env bash
# The one-shot GPU check: the quick GPU test subset, the GPU benchmark (solvers and train
# steps at the default precision, then solvers at "highest"), and the Quickstart training
# run, each stage with its own time limit and log, most important first, so that a run cut
# short still leaves the most useful logs.
#
# Run it on the GPU machine from the repository root:
#   PYTHONUNBUFFERED=1 MPLBACKEND=Agg bash benchmarks/gpu_check.sh
# It needs JAX with CUDA (e.g. pip install "jax[cuda12]"), the package's dependencies and
# pytest (pip install -e ".[test]"; pytest-xdist is not used: the tests run in one process,
# which owns the GPU). PyTorch and torchdeq==0.1.0 are optional: without them the benchmark
# leaves out its torchdeq rows and says why. The script puts the repository root on
# PYTHONPATH itself, so the checkout also works uninstalled. Without a package index, install
# the same packages from wheels copied to the machine (pip install --no-index <wheels>).
#
# Logs go to $OUT (default gpu_logs/, ignored by git): device.txt (nvidia-smi, jax devices),
# summary.txt (each stage's exit code and time; 124 means it hit its limit), <stage>.log,
# the benchmark tables bench_solvers.md, bench_train.md, bench_highest.md, and the training
# run folder digits/.
#
# Time: the default stages' limits add up to 590 s (tests 110, bench_solvers 150,
# bench_train 180, bench_highest 60, train 90), so the check takes under 10 minutes.
# STAGES picks stages, e.g. STAGES="loop_kernels trip_count" for a second, short command
# (at most 150 s: kernels per solver step, benchmarks/loop_kernels.py; early exit against a
# fixed trip count, benchmarks/trip_count.py). TESTS overrides the test selection; SMALL=1
# shrinks the benchmark (for trying the script on a CPU).
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
small=()
[ "${SMALL:-0}" = 1 ] && small=(--small)
STAGES=${STAGES:-tests bench_solvers bench_train bench_highest train}
TESTS=${TESTS:-tests/test_solvers.py tests/test_causal.py tests/test_deq.py tests/test_jacobian.py tests/test_layers.py}

stage() {  # stage NAME LIMIT_S COMMAND...: run one stage, log it, say how it ended
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
for name in $STAGES; do
  case $name in
    # One process (the GPU machine has no pytest-xdist, and one process should own the GPU).
    # shellcheck disable=SC2086
    tests) stage tests 110 python3 -m pytest -o addopts=-ra -q -x --durations=10 $TESTS ;;
    bench_solvers) stage bench_solvers 150 python3 benchmarks/gpu.py "${small[@]}" --parts solvers --out "$OUT/bench_solvers.md" ;;
    bench_train) stage bench_train 180 python3 benchmarks/gpu.py "${small[@]}" --parts train --out "$OUT/bench_train.md" ;;
    bench_highest) stage bench_highest 60 python3 benchmarks/gpu.py "${small[@]}" --parts solvers --precision highest --out "$OUT/bench_highest.md" ;;
    train) stage train 90 python3 -m experiments.train --workdir="$OUT/digits" ;;
    loop_kernels) stage loop_kernels 60 python3 benchmarks/loop_kernels.py ;;
    trip_count) stage trip_count 90 python3 benchmarks/trip_count.py ;;
    *) echo "unknown stage $name" | tee -a "$OUT/summary.txt" ;;
  esac
done
