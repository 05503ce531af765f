#!/usr/bin/env bash
# Create .venv and install the project with its CPU extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# constraints-cpu.txt pins torch==2.13.0 (the CPU wheel); an unpinned torch would pull a CUDA build.
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[cpu,dev]"
