#!/usr/bin/env bash
# One-shot GPU benchmark (the prepared device check). Assumes the package is pip-installed
# (pip install -e .) and a CUDA GPU is visible. Writes the JSON and the log to $OUT when set,
# else to benchmarks/results/. Full sizes, 3 repeats. Each training row starts its own interpreter;
# the loader rows run 260 steps each: `--only loader,train` at 5 repeats took 7 minutes on one H100.
# The peak-RSS rows write ~4 GiB of HDF5 under the temp folder,
# removed as they go. Skip the preprocessing rows with: bash benchmarks/gpu.sh --only loader,train,decode
# A subset of the training rows: bash benchmarks/gpu.sh --only train --train-rows 'loader:frozen:bucketed'
# Usage: bash benchmarks/gpu.sh [extra args for python -m benchmarks]
# Environment: PYTHON (default python3), BENCH_REPEATS (default 3), BENCH_LOADER_WORKERS (0,4,8).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
stamp="$(date +%Y%m%d-%H%M%S)"
workers="${BENCH_LOADER_WORKERS:-0,4,8}"
"${PYTHON:-python3}" -m benchmarks --device cuda --repeats "${BENCH_REPEATS:-3}" --loader-workers "$workers" \
    --out "$dest/gpu-$stamp.json" "$@" 2>&1 | tee "$dest/gpu-$stamp.log"
