#!/usr/bin/env bash
# Regenerates benchmarks/cpu/: Ember (bf16 and fp32) against HF naive and HF static batching on cpu-64,
# the agentic multi-turn workload with prefix caching on and off, speculative decoding on and off
# (`ember bench latency`), then the serving latency of `ember serve` at 1, 8 and 32 concurrent clients.
# Run via `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
workload=${WORKLOAD:-../shared/workloads/cpu-64.json}
out=benchmarks/cpu
mkdir -p "$out"
ember=.venv/bin/ember

"$ember" bench throughput --workload "$workload" --dtypes bfloat16,float32 --baseline hf-naive,hf-static \
  --baseline-requests 16 --json "$out/throughput.json" --plot "$out/throughput.png" | tee "$out/throughput.txt"

"$ember" bench agentic --json "$out/agentic.json" | tee "$out/agentic.txt"

# Speculative decoding, on and off in each run: per-token latency at batch 1 and 32 on the repetitive
# workload and on cpu-64, and throughput on the whole of cpu-64 at batch 64.
for method in ngram suffix; do
  "$ember" bench latency --speculative "$method" --workload repetitive --batch-sizes 1,32 \
    --json "$out/spec-$method-repetitive.json" | tee "$out/spec-$method-repetitive.txt"
  "$ember" bench latency --speculative "$method" --workload "$workload" --num-requests 16 --batch-sizes 1 \
    --json "$out/spec-$method-cpu64-batch1.json" | tee "$out/spec-$method-cpu64-batch1.txt"
  "$ember" bench latency --speculative "$method" --workload "$workload" --batch-sizes 32,64 \
    --json "$out/spec-$method-cpu64.json" | tee "$out/spec-$method-cpu64.txt"
done

port=8765
"$ember" serve --port "$port" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do  # at most 60 s for the server to come up
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  sleep 0.1
done
"$ember" bench serve --url "http://127.0.0.1:$port" --workload "$workload" --concurrency 1,8,32 \
  --json "$out/serving.json" --plot "$out/serving.png" | tee "$out/serving.txt"
