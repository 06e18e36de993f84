#!/usr/bin/env bash
# The GPU benchmark in one call (under 8 minutes on an H100): Ember vs HF continuous batching vs HF naive
# on the GPU workload. Results go to $1, or $EMBER_RESULTS_DIR, or benchmarks/gpu/results.
# Needs only PyTorch, Triton and transformers; without a GPU it runs a tiny shape on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
exec "$python" benchmarks/gpu/bench.py --results "${1:-${EMBER_RESULTS_DIR:-benchmarks/gpu/results}}"
