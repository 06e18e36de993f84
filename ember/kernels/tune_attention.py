"""`ember tune-kernels`: time the attention kernels' launch options on this GPU and write the fastest as a tuning
file (`attention_tuning`), which the kernels use from then on.

Decode attention is timed at the batches of a serving run (256 sequences with ragged contexts, 64, 8 and 1 at
context 800) and prefill attention on 16 chunks (8 whole prompts of 1,024 tokens, 8 chunks of 512 after a
1,024-token prefix), at a model's attention shape (heads, KV heads, head_dim; default Qwen3-0.6B's). Options are
searched a step at a time from the defaults (coordinate descent): each setting of an option (or of two that
interact) is timed with the others at their best so far, and kept when it is 2% faster than the best so far (less
is timing noise); the decode objective is the sum of the four batches' times (the large batches weigh most, as in a
throughput run). A second pass over the steps follows when the first changed anything (options interact: more
blocks a trip take registers that fewer warps would have held). Last, decode over float8 caches
(`--kv-cache-dtype fp8`: blocks of half the bytes), one pass from the 16-bit result, for the options a float8 cache
takes apart (`attention_tuning.FLOAT8_OPTIONS`). About 100-140 timings in all.

A candidate's output is checked against the defaults' on the same inputs first: one that computes something else
(a compiler bug at some launch option) is left out, and said so.

Imports only torch, triton and Ember's kernels. Without a GPU it runs tiny shapes in Triton's interpreter when
TRITON_INTERPRET=1 is set (to test the tuner itself; the times mean nothing there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from ember.attention.layout import to_cache_layout
from ember.kernels import attention_tuning, triton_attention
from ember.kernels.attention_tuning import DEFAULT, AttentionTuning, CardTuning

# The search's steps, in order (what moved decode's time most first): each a list of candidate settings, one or
# two options at a time where they interact (larger query tiles need more warps)
DECODE_STEPS: tuple[list[dict[str, Any]], ...] = (
    [{"decode_prefetch": value} for value in (True, False)],
    [{"decode_pages": value} for value in (1, 2, 4)],
    [{"decode_warps": w, "decode_stages": st} for w, st in ((2, 1), (1, 1), (4, 1), (2, 2), (4, 2))],
    [{"programs_per_sm": value} for value in (4, 8, 16, 32, 64)],
)
PREFILL_STEPS: tuple[list[dict[str, Any]], ...] = (
    [{"prefill_prefetch": value} for value in (True, False)],
    [{"prefill_pages": value} for value in (1, 2, 4)],
    [{"prefill_block_m": m, "prefill_warps": w} for m, w in ((64, 4), (32, 4), (64, 8), (128, 4), (128, 8))],
)
MARGIN = 0.02  # a setting replaces the best so far when it is this much faster: timing noise decides nothing
BENCH_MS = 25  # milliseconds of replays per timing, ten times (`do_bench_cudagraph`)
MAX_RELATIVE_ERROR = 2e-2  # bf16 against the defaults' output
FLOAT8 = torch.float8_e4m3fn  # the cache of `--kv-cache-dtype fp8`


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int = 16


@dataclass
class Case:
    """One timed input: a label and the call for a tuning (its output checked against the defaults')."""

    label: str
    run: Callable[[AttentionTuning], torch.Tensor]


def random_caches(
    shape: AttentionShape, num_blocks: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values of `dtype` in the device's cache layout."""
    size = (shape.kv_heads, num_blocks, shape.block_size, shape.head_dim)
    return to_cache_layout(torch.randn(size, device=device).to(dtype), torch.randn(size, device=device).to(dtype))


class DecodeInputs:
    """Single-token queries over contexts of `lengths` (their blocks at random places in a cache of `cache_dtype`,
    default the queries' `dtype`)."""

    def __init__(
        self, shape: AttentionShape, lengths: torch.Tensor, device: torch.device, dtype: torch.dtype,
        cache_dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        from ember.engine.decode_graphs import longest_first

        batch, width = len(lengths), -(-int(lengths.max()) // shape.block_size)
        self.k_cache, self.v_cache = random_caches(shape, batch * width, device, cache_dtype or dtype)
        self.tables = torch.randperm(batch * width, device=device).view(batch, width)
        self.q = torch.randn(batch, shape.heads, shape.head_dim, device=device).to(dtype)
        self.order = torch.from_numpy(longest_first(lengths.numpy())).to(device)  # the engine's: longest first
        self.lens = lengths.to(device)
        self.scale = shape.head_dim**-0.5

    def run(self, tuning: AttentionTuning, splits: int | None = None, ordered: bool = True) -> torch.Tensor:
        """Decode attention under `tuning` (`splits`: instead of its split count; `ordered`: longest first)."""
        order = self.order if ordered else None
        decode = triton_attention.paged_decode_attention
        return decode(self.q, self.k_cache, self.v_cache, self.tables, self.lens, self.scale, splits, order=order, tuning=tuning)  # noqa: E501  # fmt: skip


def decode_cases(
    shape: AttentionShape, device: torch.device, dtype: torch.dtype, tiny: bool, cache_dtype: torch.dtype | None = None
) -> list[Case]:
    """A serving run's decode batches: 256 ragged contexts (uniform from 100 to 1,500), then 64, 8 and 1 at 800."""
    generator = torch.Generator().manual_seed(0)
    if tiny:
        batches = [("b3 ragged", torch.randint(1, 60, (3,), generator=generator))]  # each program is Python there
    else:
        batches = [("b256 ragged", torch.randint(100, 1501, (256,), generator=generator))]
        batches += [(f"b{batch} ctx800", torch.full((batch,), 800)) for batch in (64, 8, 1)]
    return [Case(label, DecodeInputs(shape, lengths, device, dtype, cache_dtype).run) for label, lengths in batches]


def prefill_chunks(tiny: bool) -> list[tuple[int, int]]:
    """(cached prefix, chunk length): 8 whole prompts of 1,024 tokens, 8 chunks of 512 after a prefix of 1,024."""
    return [(0, 24), (16, 8)] if tiny else [(0, 1024)] * 8 + [(1024, 512)] * 8


class PrefillInputs:
    """Query chunks after their cached prefixes (`chunks`: (prefix, length) pairs), each sequence's blocks in a
    row of the cache."""

    def __init__(
        self, shape: AttentionShape, chunks: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> None:
        blocks = [-(-(prefix + length) // shape.block_size) for prefix, length in chunks]
        self.k_cache, self.v_cache = random_caches(shape, sum(blocks), device, dtype)
        self.tables = torch.zeros(len(chunks), max(blocks), dtype=torch.int64, device=device)
        first = 0
        for i, n in enumerate(blocks):
            self.tables[i, :n] = torch.arange(first, first + n, device=device)
            first += n
        self.lengths, self.contexts = [length for _, length in chunks], [prefix + length for prefix, length in chunks]
        self.starts = [sum(self.lengths[:i]) for i in range(len(chunks))]
        self.q = torch.randn(sum(self.lengths), shape.heads, shape.head_dim, device=device).to(dtype)
        self.device, self.scale = device, shape.head_dim**-0.5
        self.launches: dict[int, triton_attention.PrefillLaunch] = {}  # by query-tile height

    def run(self, tuning: AttentionTuning) -> torch.Tensor:
        block_m = tuning.prefill_block_m
        if block_m not in self.launches:
            self.launches[block_m] = triton_attention.prefill_launch(
                self.starts, self.lengths, self.contexts, self.device, block_m
            )
        prefill = triton_attention.paged_prefill_attention
        return prefill(self.q, self.k_cache, self.v_cache, self.tables, self.launches[block_m], self.scale, tuning=tuning)  # noqa: E501  # fmt: skip


def prefill_case(shape: AttentionShape, device: torch.device, dtype: torch.dtype, tiny: bool) -> Case:
    chunks = prefill_chunks(tiny)
    label = f"{len(chunks)} chunks, {sum(length for _, length in chunks)} rows"
    return Case(label, PrefillInputs(shape, chunks, device, dtype).run)


def kernel_seconds(fn: Callable[[], Any], device: torch.device, replay_ms: float = BENCH_MS) -> float:
    """One call's kernel time: CUDA-graph replays on a GPU (no launch overhead, as the engine's decode steps; ten
    timings of `replay_ms`), one call's wall time in the interpreter."""
    if device.type == "cuda":
        return triton.testing.do_bench_cudagraph(fn, rep=replay_ms) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Search:
    """Coordinate descent over the options of `AttentionTuning` on a list of cases, from `start`; prints each
    timing."""

    def __init__(
        self, kind: str, cases: list[Case], device: torch.device, start: AttentionTuning,
        timer: Callable[[Callable[[], Any]], float] | None = None,
    ) -> None:  # fmt: skip
        self.kind, self.cases = kind, cases
        self.timer = timer or functools.partial(kernel_seconds, device=device)  # seconds of a call
        self.start = self.best = start
        self.expected = [case.run(DEFAULT).float() for case in cases]  # the defaults' outputs
        self.times: dict[AttentionTuning, float] = {}  # summed over the cases; infinity: left out

    def total(self, tuning: AttentionTuning, label: str = "start") -> float:
        """The summed time of the cases under `tuning` (measured once; infinity when it fails or computes
        something else)."""
        if tuning not in self.times:
            self.times[tuning] = self._measure(tuning, label)
        return self.times[tuning]

    def _measure(self, tuning: AttentionTuning, label: str) -> float:
        total = 0.0
        for case, expected in zip(self.cases, self.expected, strict=True):
            try:  # (a kernel's failure may surface at the next sync: the error's `item`, or the timing)
                error = ((case.run(tuning).float() - expected).norm() / expected.norm()).item()
                if not error < MAX_RELATIVE_ERROR:  # (NaN too)
                    why = f"its output differs from the defaults' (relative error {error:.3g})"
                    return self._left_out(label, case, why)
                seconds = self.timer(lambda: case.run(tuning))  # noqa: B023
            except (RuntimeError, triton.runtime.errors.OutOfResources) as failure:  # e.g. too much shared memory
                return self._left_out(label, case, f"{type(failure).__name__}: {failure}")
            print(f"  {self.kind:8s} {label:40s} {case.label:18s} {seconds * 1e6:10.1f} us", flush=True)
            total += seconds
        return total

    def _left_out(self, label: str, case: Case, why: str) -> float:
        print(f"  {self.kind:8s} {label:40s} {case.label:18s} left out: {why}", flush=True)
        return float("inf")

    def run(
        self, steps: tuple[list[dict[str, Any]], ...], passes: int = 2,
        after_step: Callable[[], None] = lambda: None,
    ) -> AttentionTuning:  # fmt: skip
        """The fastest options found: at each step the candidate settings timed with the other options at their
        best so far, one kept when it beats the best so far by MARGIN; the steps again (up to `passes` times)
        while a pass changes the best. Settings already timed with the same other options are not timed again.
        `after_step` is called after each step (to save the best so far)."""
        if self.total(self.start) == float("inf"):
            raise RuntimeError(f"{self.kind} attention failed with the starting options {self.start}")
        for _ in range(passes):
            before = self.best
            for settings in steps:
                for setting in settings:
                    candidate = dataclasses.replace(self.best, **setting)
                    label = ", ".join(f"{name}={value}" for name, value in setting.items())
                    if self.total(candidate, label) < (1 - MARGIN) * self.total(self.best):
                        self.best = candidate
                after_step()
            if self.best == before:
                break
        return self.best

    def notes(self) -> dict[str, Any]:
        return {"cases": [case.label for case in self.cases], "start_us": 1e6 * self.total(self.start),
                "tuned_us": 1e6 * self.total(self.best)}  # fmt: skip


def tune(
    shape: AttentionShape, device: torch.device, dtype: torch.dtype,
    save: Callable[[CardTuning, dict[str, Any]], None],
) -> CardTuning:  # fmt: skip
    """The fastest options found for `shape` on `device`: decode, then prefill, from the defaults; then decode over
    float8 caches (`--kv-cache-dtype fp8`), one pass from the 16-bit cache's options. `save` gets the best so far
    and notes on the search (times in microseconds) after each step, so a search cut short leaves what it found."""
    tiny = device.type != "cuda"
    decode = Search("decode", decode_cases(shape, device, dtype, tiny), device, DEFAULT)
    decode.run(DECODE_STEPS, after_step=lambda: save(CardTuning.same(decode.best), {"decode": decode.notes()}))
    prefill = Search("prefill", [prefill_case(shape, device, dtype, tiny)], device, decode.best)
    prefill.run(PREFILL_STEPS, after_step=lambda: save(CardTuning.same(prefill.best), {"prefill": prefill.notes()}))
    float8_cases = decode_cases(shape, device, dtype, tiny, FLOAT8)
    float8 = Search("fp8", float8_cases, device, prefill.best)
    float8.run(DECODE_STEPS, passes=1, after_step=lambda: save(CardTuning(prefill.best, float8.best), {"decode_fp8": float8.notes()}))  # noqa: E501  # fmt: skip
    return CardTuning(prefill.best, float8.best)


def attention_shape(model: str, block_size: int) -> AttentionShape:
    from ember.config import ModelConfig
    from ember.models.loader import dummy_hf_config

    cfg = ModelConfig.from_hf_dict(dummy_hf_config(model))
    return AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size)


def tune_command(args: argparse.Namespace) -> int:
    """`ember tune-kernels`: tune, print the table and the choice, write the file."""
    interpreted = not torch.cuda.is_available()
    shape = attention_shape(args.model, args.block_size)  # (checked here too: a bad --model fails before timing)
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        message = "no CUDA GPU here (the launch options tuned are the GPU kernels'; TRITON_INTERPRET=1 runs the "
        print(f"ember tune-kernels: {message}tuner itself on tiny shapes in Triton's interpreter)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if interpreted else "cuda")
    if interpreted:
        shape = AttentionShape(4, 2, 16)  # a shape the interpreter runs in seconds
    card = "CPU (Triton's interpreter)" if interpreted else torch.cuda.get_device_name()
    output = args.output or attention_tuning.user_tuning_path(
        "interpreter" if interpreted else attention_tuning.card_name(device)
    )
    print(f"tuning the attention kernels on {card} for {shape} (bf16)", flush=True)
    started = time.perf_counter()
    header = {"card": card, "shape": dataclasses.asdict(shape), "dtype": "bfloat16", "torch": torch.__version__,
              "triton": triton.__version__,
              "tuned_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
    notes: dict[str, Any] = {}

    def save(best: CardTuning, search_notes: dict[str, Any], complete: bool = False) -> None:
        notes.update(search_notes)
        seconds = round(time.perf_counter() - started, 1)
        attention_tuning.save(output, best, {**header, "complete": complete, "seconds": seconds, **notes})

    with torch.inference_mode():
        tuned = tune(shape, device, torch.bfloat16, save)
    save(tuned, {}, complete=True)
    for kind, start in (("decode", "the defaults"), ("prefill", "the defaults"), ("decode_fp8", "the 16-bit options")):
        note = notes[kind]
        print(f"{kind}: {note['start_us']:.1f} us with {start}, {note['tuned_us']:.1f} us tuned "
              f"({note['start_us'] / note['tuned_us']:.2f}x) over {', '.join(note['cases'])}")  # fmt: skip
    for cache, options in (("16-bit", tuned.wide), ("float8", tuned.float8)):
        changed = {k: v for k, v in dataclasses.asdict(options).items() if getattr(DEFAULT, k) != v}
        print(f"tuned options, {cache} caches: {changed or 'the defaults'}")
    note = " (the CPU reads a tuning file only through EMBER_ATTENTION_TUNING)" if interpreted else ""
    print(f"wrote {output}{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ember tune-kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="qwen3-0.6b",
        help="the attention shape to tune for: a dummy-weights preset or a directory with config.json "
        "(default: qwen3-0.6b)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=16,
        choices=(16, 32, 64),
        help="KV-cache block size (default: 16, the engine's)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the tuning file to write (default: <cache dir>/kernels/attention-<card>.json, where the kernels look)",
    )
    return tune_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
