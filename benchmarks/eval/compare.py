"""Per-sample comparison of two lm-evaluation-harness runs (`--log_samples`): Ember's server against HF
transformers. Loglikelihoods must agree closely and their "is greedy" flags exactly; generations exactly.

Usage: python benchmarks/eval/compare.py EMBER_OUTPUT_DIR HF_OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def samples(folder: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Every logged sample under an output folder, by (task, doc id)."""
    found = {}
    for path in Path(folder).rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]  # samples_<task>_<timestamp>.jsonl
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            found[(task, sample["doc_id"])] = sample
    return found


def main(ember_dir: str, hf_dir: str) -> int:
    ember, hf = samples(ember_dir), samples(hf_dir)
    if not ember or ember.keys() != hf.keys():
        print(f"the runs logged different samples: {len(ember)} and {len(hf)}")
        return 1
    worst, scored, greedy_mismatches, generated, same_generations = 0.0, 0, 0, 0, 0
    for key, sample in ember.items():
        for ours, theirs in zip(sample["resps"], hf[key]["resps"], strict=True):
            if isinstance(ours[0], list):  # a loglikelihood: [logprob, is_greedy]
                (ll, greedy), (hf_ll, hf_greedy) = ours[0], theirs[0]
                worst = max(worst, abs(float(ll) - float(hf_ll)))
                greedy_mismatches += greedy != hf_greedy
                scored += 1
            else:  # a generation
                same_generations += ours == theirs
                generated += 1
    print(f"loglikelihoods: {scored}, largest difference {worst:.2e}, is-greedy flags differing: {greedy_mismatches}")
    print(f"generations: {generated}, identical: {same_generations}")
    return 0 if worst < 1e-3 and greedy_mismatches == 0 and same_generations == generated else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
