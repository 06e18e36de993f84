"""What structured output costs per token: SmolLM2 decoding the same batches free and under JSON schemas.

Every request writes exactly `--tokens` tokens (each schema is an array of strings with no end before that, and
the free run ignores EOS), so the runs differ only by the grammar: one bitmask fill per constrained row per
step on the host, one masking of the logits, one matcher advance per token. The second schema bounds each
string's length (`maxLength`), which makes nearly every token's validity depend on the matcher's state: the
bitmask fill's worst case.
`.venv/bin/python benchmarks/cpu/structured_output.py [--batch-sizes 1,8,32] [--tokens 128] [--dtype float32]`
"""

from __future__ import annotations

import argparse
import json
import time

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.engine.structured_output import StructuredOutputs


def list_of_words(item: dict) -> dict:
    return {
        "type": "object",
        "properties": {"words": {"type": "array", "items": item, "minItems": 1000}},
        "required": ["words"],
    }


SCHEMAS = {
    "strings": list_of_words({"type": "string"}),
    "maxLength 12": list_of_words({"type": "string", "maxLength": 12}),
}


def ms_per_step(llm: LLM, batch: int, params: SamplingParams, prompts: list[str]) -> float:
    """Best of three: milliseconds per decode step of `batch` requests (prefill step excluded)."""
    runs = []
    for _ in range(3):
        first = time.perf_counter()
        llm.generate(prompts[:batch], SamplingParams(**{**params.__dict__, "max_tokens": 1}))
        prefill = time.perf_counter() - first
        start = time.perf_counter()
        outputs = llm.generate(prompts[:batch], params)
        elapsed = time.perf_counter() - start - prefill
        assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outputs), "a request ended early"
        runs.append(elapsed / (params.max_tokens - 1) * 1000)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each request writes (default 128)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype, enable_prefix_caching=False)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts = [f"List {i + 3} words about the sea, as JSON:" for i in range(max(batches))]
    free = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, ignore_eos=True)
    constrained = {
        name: SamplingParams(
            max_tokens=args.tokens, temperature=1.0, seed=0, structured_outputs=StructuredOutputs(json=schema)
        )
        for name, schema in SCHEMAS.items()
    }
    for params in constrained.values():
        llm.generate(prompts[:1], params)  # compiles the grammar and warms up
    print(f"SmolLM2 {args.dtype}, {args.tokens} tokens per request; schemas: {json.dumps(SCHEMAS)}")
    print(f"{'batch':>5s} {'free ms/step':>13s}" + "".join(f" {name + ' ms/step':>22s}" for name in SCHEMAS))
    for batch in batches:
        plain = ms_per_step(llm, batch, free, prompts)
        line = f"{batch:5d} {plain:13.2f}"
        for params in constrained.values():
            ms = ms_per_step(llm, batch, params, prompts)
            line += f" {f'{ms:.2f} ({ms / plain - 1:+.0%})':>22s}"
        print(line)


if __name__ == "__main__":
    main()
