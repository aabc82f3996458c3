#!/usr/bin/env bash
# The one-shot GPU check of issue 12: the quick GPU test subset, the GPU benchmark (default
# precision, then solvers at "highest"), and the Quickstart training run, each with its own
# time limit and log, most important first (a session's device time is short).
#
# On the GPU machine, from the repository root, after ../shared/device/prepare.sh has put
# the missing wheels (ml_collections, torchdeq) in .whl/ here:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg && bash benchmarks/gpu_check.sh
# Logs go to $OUT (default gpu_logs/). The default stages' limits add up to 590 s, under the
# device tool's 600 s per command. SMALL=1 shrinks the benchmark (a test of this script on a
# CPU); TESTS overrides the test selection; STAGES picks stages, e.g.
# STAGES="loop_kernels trip_count" for a second, short command (150 s: kernels per solver
# step, benchmarks/loop_kernels.py; early exit vs a fixed trip count, benchmarks/trip_count.py).
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
