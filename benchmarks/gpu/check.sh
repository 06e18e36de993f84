#!/usr/bin/env bash
# Everything a GPU session checks, in one call of at most 10 minutes (the device's limit per call); each part has
# its own time limit, so a slow or hung part cannot take the later ones' time:
#   tune     the attention kernels' launch options timed on this card (`ember tune-kernels`, 150 s; 16-bit and float8 caches), written to
#            $out/attention-tuning.json: every later part runs on them (EMBER_ATTENTION_TUNING), and the file is
#            what ember/kernels/tuned/<card>.json ships; without it (the part failed) they run on the defaults;
#   bench    the throughput table: Ember (its default, on the tuned options; on the default options; with a float8
#            KV cache), HF naive and HF continuous batching (bench.py, 200 s; HF's parts take ~100 s of it);
#   kernels  each kernel and whole decode steps against their floors, decode over ragged contexts at several
#            split counts, a float8 cache and larger blocks (kernel_times.py, 120 s);
#   tests    the Triton kernel tests and the bf16 parity tests, compiled on the GPU (90 s; 50 s on an H200);
#   host     the host's Python time per decode step at batch 256 on this machine's CPU, async scheduling as the
#            engine runs here, prompts of 32 and 700 tokens (host_overhead.py).
# CHECK_PARTS="bench kernels" runs only those parts (e.g. to rerun what a first call cut short).
# Logs and JSON go to $1 (default: $EMBER_RESULTS_DIR, else benchmarks/gpu/results), at most 8 files.
# A failing or timed-out part does not stop the later ones; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${EMBER_RESULTS_DIR:-benchmarks/gpu/results}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

parts=" ${CHECK_PARTS:-tune bench kernels tests host} "

part() {  # part NAME SECONDS LOG COMMAND...: if NAME is selected, COMMAND under a time limit, output into LOG
    local name=$1 limit=$2 log=$3
    shift 3
    [[ "$parts" == *" $name "* ]] || return 0
    local began=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    echo "check.sh: part $name took $((SECONDS - began)) s of its $limit" | tee -a "$log"
    if [ "$code" -ne 0 ]; then
        echo "check.sh: '$*' ended with status $code (124: over its ${limit} s limit)" | tee -a "$log"
        status=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || status=1
tuning="$out/attention-tuning.json"
part tune 150 "$out/tune.log" "$python" -m ember.kernels.tune_attention --output "$tuning"
[ -f "$tuning" ] && export EMBER_ATTENTION_TUNING="$(realpath "$tuning")"
part bench 200 "$out/bench.log" "$python" benchmarks/gpu/bench.py --results "$out" --variants default,untuned,fp8kv \
    --hf-cb-seconds 45 --naive-seconds 30
part kernels 120 "$out/kernels.log" "$python" benchmarks/gpu/kernel_times.py --results "$out"
part tests 90 "$out/tests.log" "$python" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_tiny_parity.py tests/test_attention_tuning.py
part host 25 "$out/bench.log" bash -c "for prompt in 32 700; do $python benchmarks/host_overhead.py --profile 0 \
    --async-scheduling --prompt-tokens \$prompt || exit 1; done"
exit $status
