#!/usr/bin/env bash
# The first GPU run (benchmarks/gpu_check.py): every method on the 7B geometries with random weights
# (no download), FastV engine vs eager, DivPrune vectorised vs loops, AutoSelect's scorer, the K=64
# roofline; writes reports/gpu/<device>/ and prints each target as pass / miss. About 8 minutes on
# one H100. Without CUDA (or with --smoke) it runs the same on tiny random models in seconds.
#   scripts/gpu_check.sh [--smoke] [--out reports/gpu] [--results results] [--repeats N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
GPU_CHECK_ENTRY=scripts/gpu_check.sh exec "$python" -m benchmarks.gpu_check "$@"
