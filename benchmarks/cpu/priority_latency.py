"""What the priority policy buys: interactive requests arriving while a batch job fills every sequence slot.

SmolLM2 (bf16, offline engine, `--max-num-seqs 16`): 32 batch requests (priority 1; 256 prompt tokens, 256 new
tokens) start together; once they run, 4 interactive requests (priority 0; 64 prompt tokens, 32 new) arrive.
Under `fcfs` the interactive ones wait for batch requests to end; under `priority` they preempt the least
important running ones at once. Printed per policy: the interactive requests' time to first token and to their
last token (mean and max), and the whole run's wall time and output tok/s (what preemption costs the batch).
`.venv/bin/python benchmarks/cpu/priority_latency.py`
"""

from __future__ import annotations

import argparse
import statistics
import time

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

BATCH, INTERACTIVE, SLOTS = 32, 4, 16
ARRIVAL_STEP = 20  # the batch job's steps before the interactive requests arrive


def run(policy: str, dtype: str) -> dict[str, float]:
    llm = LLM(dtype=dtype, max_num_seqs=SLOTS, scheduling_policy=policy)
    engine = llm.engine
    batch_params = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    interactive_params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    low = 1 if policy == "priority" else 0
    for i in range(BATCH):
        engine.add_request([1000 + (i * 7 + j) % 5000 for j in range(256)], batch_params, priority=low)
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens = 0
    start = time.perf_counter()
    for step in range(100_000):  # bounded
        if step == ARRIVAL_STEP:
            for i in range(INTERACTIVE):
                request_id = engine.add_request([2000 + 13 * i + j for j in range(64)], interactive_params)
                arrived[request_id] = time.perf_counter()
        for out in engine.step():
            tokens += len(out.outputs[0].token_ids)
            if out.request_id in arrived:
                first.setdefault(out.request_id, time.perf_counter())
                if out.finished:
                    last[out.request_id] = time.perf_counter()
        if not engine.has_unfinished_requests():
            break
    wall = time.perf_counter() - start
    ttft = [first[r] - arrived[r] for r in arrived]
    e2e = [last[r] - arrived[r] for r in arrived]
    return {
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
        "e2e_mean": statistics.mean(e2e),
        "e2e_max": max(e2e),
        "wall": wall,
        "tok_s": tokens / wall,
        "preemptions": engine.scheduler.num_preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    print("policy    TTFT mean / max (s)   last token mean / max (s)   run wall (s)   output tok/s   preemptions")
    for policy in ("fcfs", "priority"):
        r = run(policy, args.dtype)
        print(
            f"{policy:9} {r['ttft_mean']:8.2f} / {r['ttft_max']:<8.2f}  {r['e2e_mean']:10.2f} / {r['e2e_max']:<10.2f}"
            f"  {r['wall']:12.1f}   {r['tok_s']:12.1f}   {r['preemptions']:11.0f}"
        )


if __name__ == "__main__":
    main()
