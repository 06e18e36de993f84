#!/usr/bin/env bash
# Everything a GPU session checks, in one call (about 8 minutes on an H100; the device allows 10 a call):
#   1. the Triton kernel tests and the bf16 parity tests, compiled on the GPU;
#   2. each kernel and whole decode steps against their floors (benchmarks/gpu/kernels.py);
#   3. the host's Python time per decode step at batch 256 on this machine's CPU (host_overhead.py, seconds);
#   4. the throughput table: Ember (CUDA graphs; with async scheduling; eager), HF continuous batching and
#      HF naive (bench.py).
# Logs and JSON go to $1 (default: $EMBER_RESULTS_DIR, else benchmarks/gpu/results), at most 6 files.
# A failing step does not stop the later ones; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${EMBER_RESULTS_DIR:-benchmarks/gpu/results}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || status=1
"$python" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_tiny_parity.py 2>&1 \
    | tee "$out/tests.log" || status=1
"$python" benchmarks/gpu/kernels.py --results "$out" 2>&1 | tee "$out/kernels.log" || status=1
"$python" benchmarks/host_overhead.py --profile 0 2>&1 | tee "$out/bench.log" || status=1
"$python" benchmarks/gpu/bench.py --results "$out" --variants graphs,async,eager --hf-cb-seconds 90 \
    --naive-seconds 45 2>&1 \
    | tee -a "$out/bench.log" || status=1
exit $status
