"""`ember bench agentic`: multi-turn agent sessions that re-send a long shared prefix on every call.

Each of `sessions` sessions shares one system+tools prefix; each turn appends the previous answer and a
new user message and calls the model again, as an agent loop does. Sessions run concurrently; within a
session turns are sequential. Answer lengths vary (uniform in [answer_tokens / 2, answer_tokens * 3 / 2],
seeded): with equal lengths every session would finish and re-submit in the same step, a lock-step
burst that real agents, whose answers differ, do not produce. The same workload runs with prefix caching
on and off in one process, and the mean time to first token of turns >= 2 (the ones that can reuse a
prefix) is compared.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.engine.sampling_params import SamplingParams


@dataclass
class Session:
    prompt: list[int]
    turn: int = 0
    request_id: str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    answer: list[int] = field(default_factory=list)


def user_message(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(32, 64))]


def run_sessions(
    llm: Any, sessions: int, turns: int, prefix_tokens: int, answer_tokens: int, seed: int = 0
) -> dict[str, Any]:
    """Drive the engine through every session's turns; returns TTFTs by turn and the wall time."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(prefix_tokens)]
    states = [Session(prefix + user_message(rng, vocab)) for _ in range(sessions)]
    lengths = (max(1, answer_tokens // 2), answer_tokens * 3 // 2)
    ttft: dict[int, list[float]] = {t: [] for t in range(1, turns + 1)}
    by_id: dict[str, Session] = {}

    def submit(state: Session) -> None:
        state.turn += 1
        state.answer, state.first_token = [], None
        state.submitted = time.perf_counter()
        params = SamplingParams(max_tokens=rng.randint(*lengths), temperature=0, ignore_eos=True)
        state.request_id = engine.add_request(list(state.prompt), params)
        by_id[state.request_id] = state

    start = time.perf_counter()
    for state in states:
        submit(state)
    while engine.has_unfinished_requests():
        for out in engine.step():
            state = by_id[out.request_id]
            now = time.perf_counter()
            if state.first_token is None and out.outputs and out.outputs[0].token_ids:
                state.first_token = now
                ttft[state.turn].append(now - state.submitted)
            for o in out.outputs:
                state.answer.extend(o.token_ids)
            if out.finished:
                del by_id[out.request_id]
                if state.turn < turns:
                    state.prompt += state.answer + user_message(rng, vocab)
                    submit(state)
    return {
        "wall_s": time.perf_counter() - start,
        "ttft_by_turn": {t: statistics.fmean(v) for t, v in ttft.items()},
        "mean_ttft_turn2plus_s": statistics.fmean([x for t, v in ttft.items() if t >= 2 for x in v]),
        "mean_ttft_turn1_s": statistics.fmean(ttft[1]),
    }


def bench_agentic(args: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from ember.cli import load_llm

    console = Console(stderr=True)
    results = {}
    for caching in (True, False):
        args.no_prefix_caching = not caching
        llm = load_llm(args)
        llm.engine.add_request([0, 1, 2], SamplingParams(max_tokens=2))  # warm-up
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        llm.engine.reset_prefix_cache()
        label = "caching on" if caching else "caching off"
        with console.status(f"{args.sessions} sessions x {args.turns} turns, {label} ..."):
            results[label] = run_sessions(llm, args.sessions, args.turns, args.prefix_tokens, args.answer_tokens)
        del llm
    on, off = results["caching on"], results["caching off"]
    table = Table(
        title=f"agentic: {args.sessions} sessions x {args.turns} turns, {args.prefix_tokens}-token shared "
        f"prefix, ~{args.answer_tokens}-token answers"
    )
    for column in ("prefix caching", "mean TTFT turn 1", "mean TTFT turns >= 2", "wall s"):
        table.add_column(column, justify="right")
    for label, r in results.items():
        table.add_row(
            label,
            f"{r['mean_ttft_turn1_s'] * 1000:.0f} ms",
            f"{r['mean_ttft_turn2plus_s'] * 1000:.0f} ms",
            f"{r['wall_s']:.1f}",
        )
    Console(width=120).print(table)
    ratio = off["mean_ttft_turn2plus_s"] / on["mean_ttft_turn2plus_s"]
    Console().print(f"mean TTFT of turns >= 2: {ratio:.1f}x lower with prefix caching")
    report = {
        "command": shlex.join(["ember", *args.argv]),
        "results": results,
        "ttft_turn2plus_ratio": ratio,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def add_agentic_args(parser: Any) -> None:
    parser.add_argument("--sessions", type=int, default=16, help="concurrent agent sessions (default 16)")
    parser.add_argument("--turns", type=int, default=8, help="model calls per session (default 8)")
    parser.add_argument(
        "--prefix-tokens", type=int, default=1000, help="shared system+tools prefix length (default 1000)"
    )
    parser.add_argument(
        "--answer-tokens", type=int, default=32, help="mean tokens generated per turn, varying by ±50%% (default 32)"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
