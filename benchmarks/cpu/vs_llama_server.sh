#!/usr/bin/env bash
# Ember's server against llama.cpp's (`llama-server`) on the same GGUF file (the embedded SmolLM2-135M-Instruct),
# the same machine and threads, the same client: `ember bench serve` on cpu-64's token-id prompts (greedy,
# ignore_eos, streamed), at 1, 8 and 32 concurrent clients. Each level runs against a freshly started server
# (llama-server reuses a slot's cached prompt; a fresh start keeps both cold), with as many llama.cpp slots as
# clients (`-np`), 2,048 tokens of context each, continuous batching on.
#
#   LLAMA_SERVER=/path/to/llama-server bash benchmarks/cpu/vs_llama_server.sh [out_dir]
#
# llama-server from PyPI's llama-cpp-python source package (this machine reaches no other site): see
# benchmarks/README.md, "Against llama.cpp".
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
out=${1:-benchmarks/cpu}
workload=${WORKLOAD:-../shared/workloads/cpu-64.json}
levels=${LEVELS:-1 8 32}
threads=${THREADS:-$(nproc)}
port=8766
ember=.venv/bin/ember
gguf=$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")

start_server() {  # engine, clients -> sets $server
  if [ "$1" = ember ]; then
    "$ember" serve --port "$port" > "$out/vs-llama-server-$1.log" 2>&1 &
  else
    "$LLAMA_SERVER" -m "$gguf" --port "$port" -t "$threads" -np "$2" -c $((2048 * $2)) --cont-batching \
      > "$out/vs-llama-server-$1.log" 2>&1 &
  fi
  server=$!
  for _ in $(seq 1 1200); do  # at most 120 s to come up
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
    sleep 0.1
  done
  echo "the $1 server did not come up (see $out/vs-llama-server-$1.log)" >&2
  return 1
}

stop_server() {
  kill -TERM "$server" 2> /dev/null || true
  wait "$server" 2> /dev/null || true
}
trap stop_server EXIT

: > "$out/vs-llama-server.txt"  # this run's tables only
for engine in ember llama.cpp; do
  for clients in $levels; do
    start_server "$engine" "$clients"
    "$ember" bench serve --url "http://127.0.0.1:$port" --workload "$workload" --concurrency "$clients" \
      --keep-prefix-cache --json "$out/vs-llama-server-$engine-$clients.json" | tee -a "$out/vs-llama-server.txt"
    stop_server
  done
done
