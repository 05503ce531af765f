#!/usr/bin/env bash
# Benchmarks 1-3 on one GPU at BERT-base scale (bf16), each with its own time limit, every table into
# one results file: top-k search (N = 1e4 .. 1e7), doc-encoder embedding, the REALM training step.
#
#   bash scripts/gpu_bench.sh [RESULTS.md]        (default bench/RESULTS.md; PYTHON=python3 on a GPU image)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${1:-bench/RESULTS.md}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
run() {  # run SECONDS ARGS...: one benchmark, killed at its limit, the others still run
  local limit=$1 t0=$SECONDS
  shift
  echo "== $* ==" && timeout "$limit" "$PY" "$@" --results "$RESULTS"
  echo "== rc $? in $((SECONDS - t0)) s =="
}
run 180 bench/topk.py --max-rows 1e6
run 160 bench/embed_throughput.py --batch-sizes 128,512 --blocks 1024
run 70 bench/train_step.py --batch-sizes 32,64 --index sharded
run 140 bench/train_step.py --batch-sizes 64 --index sharded --compile
