"""Benchmark workloads: a JSON file of token-id requests (see shared/workloads) or a seeded random one."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    prediction: list[int] | None = None  # what the answer is expected to repeat (a predicted output)


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)


def random_workload(
    vocab_size: int,
    num_requests: int = 64,
    prompt_len: tuple[int, int] = (64, 512),
    output_len: tuple[int, int] = (32, 256),
    seed: int = 0,
) -> Workload:
    """The shape of cpu-64 (uniform prompt and output lengths) with random token ids."""
    rng = random.Random(seed)
    requests = [
        BenchRequest([rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
        for _ in range(num_requests)
    ]
    return Workload(f"random-{num_requests}", requests)


def positive_int(text: str) -> int:
    """An argparse type for counts such as --num-requests: 0 would otherwise read as "not given"."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_workload_spec(spec: str) -> None:
    """Reject a workload argument before any model is loaded."""
    if spec == "agentic":
        raise ValueError(
            "the agentic workload is multi-turn (each turn waits for the last answer): run `ember bench agentic`"
        )
    if spec != "random" and not Path(spec).is_file():
        raise ValueError(f"workload file {spec!r} not found (expected 'random' or a workload JSON)")


def load_workload(spec: str, vocab_size: int, num_requests: int | None = None) -> Workload:
    """`spec` is 'random' or a JSON file with requests[i].prompt_ids and .max_new_tokens."""
    if spec == "random":
        return random_workload(vocab_size, num_requests or 64)
    check_workload_spec(spec)
    path = Path(spec)
    try:
        data = json.loads(path.read_text())
        requests = [BenchRequest(list(r["prompt_ids"]), int(r["max_new_tokens"])) for r in data["requests"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read workload {spec!r} (expected 'random' or a JSON file with "
            f"requests[].prompt_ids and requests[].max_new_tokens): {e}"
        ) from e
    if any(t >= vocab_size or t < 0 for r in requests for t in r.prompt_ids):
        raise ValueError(f"workload {spec!r} has token ids outside the model's vocabulary of {vocab_size}")
    if num_requests is not None:
        requests = requests[:num_requests]
    return Workload(path.stem, requests)
