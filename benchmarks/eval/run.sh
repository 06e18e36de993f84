#!/usr/bin/env bash
# lm-evaluation-harness against Ember's server (local-completions: echo + logprobs for loglikelihoods, the
# server's /tokenize for tokens) and against HF transformers on the same GGUF, then a per-sample comparison.
# Usage: bash benchmarks/eval/run.sh [LM_EVAL_VENV]   (run from anywhere, after `make install`)
# EMBER_EVAL_TASKS picks the tasks of benchmarks/eval/tasks (default ember_capitals,ember_sums; ember_larger is
# 300 four-way questions, 1,200 loglikelihoods, for timing).
# lm-eval is not one of Ember's dependencies: it goes into its own virtual environment (default
# /tmp/ember-lm-eval), with the CPU torch pin and the transformers version of Ember's .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-/tmp/ember-lm-eval}
if [ ! -x "$venv/bin/lm_eval" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch==2.13.0
    transformers=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
    "$venv/bin/pip" install --quiet "lm-eval[api]" "transformers==$transformers" gguf accelerate
fi
out=$(mktemp -d)
port=${EMBER_EVAL_PORT:-8019}
.venv/bin/ember serve --dtype float32 --port "$port" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 120); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 1; done
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1  # the tasks' data are local files
tasks=(--tasks "${EMBER_EVAL_TASKS:-ember_capitals,ember_sums}" --include_path benchmarks/eval/tasks --log_samples)
ember_args="model=SmolLM2-135M-Instruct,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=remote"
SECONDS=0
"$venv/bin/lm_eval" --model local-completions --model_args "$ember_args,num_concurrent=8" "${tasks[@]}" \
    --output_path "$out/ember"
ember_seconds=$SECONDS
SECONDS=0
gguf=$(.venv/bin/python -c 'from ember.models.loader import default_model_path; print(default_model_path())')
"$venv/bin/lm_eval" --model hf --batch_size 8 "${tasks[@]}" --output_path "$out/hf" \
    --model_args "pretrained=$(dirname "$gguf"),gguf_file=$(basename "$gguf"),dtype=float32"
echo "lm_eval wall time: Ember server ${ember_seconds} s, HF transformers ${SECONDS} s (each including lm-eval's start-up)"
.venv/bin/python benchmarks/eval/compare.py "$out/ember" "$out/hf"
echo "server log and lm-eval samples: $out"
