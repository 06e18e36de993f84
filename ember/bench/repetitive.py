"""A generated workload whose answers repeat their prompt: what agents do when they edit code or echo JSON.

Two task kinds, alternating: "rewrite this code with one change" (a seeded random Python module, one
identifier renamed) and "repeat this JSON with one field changed" (a seeded random record). Prompts go
through the model's chat template; each request may generate the length of the quoted content plus a
margin, and stops at end of sequence like a real call. Its predicted output is the quoted content as it was,
as a client asking for an edit would send it.
"""

from __future__ import annotations

import json
import random
from typing import Any

from ember.bench.workloads import BenchRequest, Workload

NAMES = ["total", "count", "items", "result", "value", "buffer", "index", "offset", "record", "payload"]
FUNCTIONS = ["parse", "load", "merge", "filter", "render", "update", "check", "encode", "resolve", "collect"]


def random_code(rng: random.Random) -> tuple[str, str, str]:
    """A small Python module, and an identifier in it with its new name."""
    lines = []
    for _ in range(rng.randint(2, 3)):
        fn, a, b = rng.choice(FUNCTIONS), rng.choice(NAMES), rng.choice(NAMES)
        lines += [
            f"def {fn}_{rng.choice(NAMES)}({a}, {b}=None):",
            f'    """{fn.capitalize()} the {a} into a new {b}."""',
            f"    {b} = {b} or []",
            f"    for item in {a}:",
            f"        if item is not None and item > {rng.randint(0, 99)}:",
            f"            {b}.append(item * {rng.randint(2, 9)})",
            f"    return {b}",
            "",
        ]
    code = "\n".join(lines)
    old = rng.choice([n for n in NAMES if n in code])
    return code, old, f"{old}_{rng.choice(['new', 'list', 'acc', 'out'])}"


def random_record(rng: random.Random) -> dict[str, Any]:
    return {
        "id": rng.randint(1000, 9999),
        "name": rng.choice(FUNCTIONS) + "-" + rng.choice(NAMES),
        "status": rng.choice(["pending", "running", "failed"]),
        "owner": {"team": rng.choice(NAMES), "priority": rng.randint(1, 5)},
        "tags": rng.sample(NAMES, 3),
        "retries": rng.randint(0, 4),
    }


def repetitive_workload(tokenizer: Any, num_requests: int = 16, seed: int = 0) -> Workload:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the repetitive workload needs a model with a tokenizer and chat template")
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        if i % 2 == 0:
            code, old, new = random_code(rng)
            content = code
            task = f"Rewrite this code, renaming `{old}` to `{new}` everywhere. Output only the code.\n\n{code}"
        else:
            record = random_record(rng)
            content = json.dumps(record, indent=2)
            task = f'Repeat this JSON exactly, but set "status" to "done". Output only the JSON.\n\n{content}'
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": task}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        quoted = tokenizer(content, add_special_tokens=False)["input_ids"]
        requests.append(BenchRequest(prompt_ids, len(quoted) + 32, quoted))
    return Workload(f"repetitive-{num_requests}", requests)
