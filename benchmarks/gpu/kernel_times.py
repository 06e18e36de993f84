"""Each of Ember's GPU kernels, and whole decode steps, against their floors on this GPU.

A kernel's floor is the larger of (bytes it must move) / (memory bandwidth) and (FLOPs) / (bf16 matmul rate); the
rates are measured in the same run (memory: the faster of a device copy and a sum of 1 GiB; an 8192^3 matmul).
Shapes are those of Qwen3-0.6B (16 heads, 8 KV heads, head_dim 128, hidden 1024, intermediate 3072, 28 layers,
vocab 151936), block size 16. The attention kernels run with the launch options in force (a tuning file's where
one applies, e.g. from `ember tune-kernels`, which sweeps them; else the defaults), decode also over ragged contexts
at several split counts and in both program orders, and last over a float8 cache and larger blocks. Decode steps
are whole-model CUDA-graph replays plus the logits, at the batch/context points of the speed-of-light probe in
issue #7 (H100: 9.2 ms at 256 x 800, 15.8 ms at 256 x 1,500, 3.3 ms at 64 x 800, 1.07 ms at batch 1), and one eager
step by kernel. Kernel times come from `triton.testing.do_bench_cudagraph` (no launch overhead).

Imports only torch, triton and this checkout. Without a GPU it runs tiny shapes in Triton's interpreter, to
check the script end to end. Usage: python benchmarks/gpu/kernel_times.py [--results DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("EMBER_KERNELS", "triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402

from ember.kernels import triton_attention, triton_elementwise  # noqa: E402
from ember.kernels.attention_tuning import AttentionTuning, tuning_for  # noqa: E402
from ember.kernels.tune_attention import (  # noqa: E402
    AttentionShape,
    DecodeInputs,
    PrefillInputs,
    kernel_seconds,
    prefill_chunks,
    random_caches,
)
from ember.models.loader import DUMMY_PRESETS  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16
FULL = {"heads": 16, "kv_heads": 8, "head_dim": 128, "hidden": 1024, "intermediate": 3072, "layers": 28,
        "vocab": 151936, "decode_points": [(256, 800), (256, 1500), (64, 800), (8, 800), (1, 800)],
        "prefill_chunks": [(0, 1024)] * 8 + [(1024, 512)] * 8, "rows": [256, 8192]}  # fmt: skip
TINY = {"heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64, "intermediate": 128, "layers": 2, "vocab": 512,
        "decode_points": [(4, 40), (1, 8)], "prefill_chunks": [(0, 24), (16, 8)], "rows": [8]}  # fmt: skip
BLOCK_SIZE = 16  # the engine's default; decode attention is also timed with the larger ones below
DECODE_BLOCK_SIZES = (32, 64)  # a block per loop trip: larger blocks, more bytes in flight per trip


# Milliseconds of replays per measurement (`do_bench_cudagraph` takes 10, each a graph of as many calls as fit):
# ~100 rows must fit check.sh's 200 s, and a graph of a 2 µs kernel's calls takes its launches' time to capture.
BENCH_MS = 40


def seconds(fn: Callable[[], Any]) -> float:
    """Kernel time of one call: CUDA-graph replays on a GPU (no launch overhead), one call's wall time on the CPU
    (the fallback checks the script, its times mean nothing)."""
    return kernel_seconds(fn, DEVICE, BENCH_MS)


def wall_seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call, host work included (for what cannot be captured: syncs, graph replays)."""
    repeat = 50 if CUDA else 1
    fn()
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def device_rates() -> tuple[float, float, float]:
    """(bytes/s of a device copy, read plus written; bytes/s of a sum, read only; bf16 matmul FLOP/s), measured
    now, after a second of matrix products: an idle GPU's clocks are low (345 MHz seen on an idle H200), which
    understates all three."""
    n, size = (8192, 1 << 30) if CUDA else (256, 1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    b = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    warm_until = time.perf_counter() + (1.0 if CUDA else 0.0)
    while time.perf_counter() < warm_until:
        a @ b
        torch.cuda.synchronize()
    copy = 2 * size / seconds(lambda: dst.copy_(src))
    words = src.view(torch.float32).normal_()
    read = size / seconds(lambda: words.sum())
    return copy, read, 2 * n**3 / seconds(lambda: a @ b)


class Report:
    def __init__(self, bandwidth: float, flops: float) -> None:
        self.bandwidth, self.flops = bandwidth, flops
        self.rows: list[dict[str, Any]] = []
        self.profiles: dict[str, list[dict[str, Any]]] = {}  # kernels by time within a whole step (`step_profile`)

    def add(
        self, kernel: str, shape: str, fn: Callable[[], Any], bytes_moved: float, flop: float = 0.0, wall: bool = False
    ) -> None:
        t = wall_seconds(fn) if wall else seconds(fn)
        floor = max(bytes_moved / self.bandwidth, flop / self.flops)
        row = {"kernel": kernel, "shape": shape, "us": t * 1e6, "floor_us": floor * 1e6, "of_floor": floor / t}
        self.rows.append(row)
        print(f"{kernel:31s} {shape:34s} {t * 1e6:10.1f} {floor * 1e6:10.1f} {100 * floor / t:8.0f}%", flush=True)


def attention_shape(s: dict[str, Any], block_size: int = BLOCK_SIZE) -> AttentionShape:
    return AttentionShape(s["heads"], s["kv_heads"], s["head_dim"], block_size)


def uniform(batch: int, context: int) -> torch.Tensor:
    return torch.full((batch,), context)


def kv_row_bytes(s: dict[str, Any], cache_dtype: torch.dtype = DTYPE) -> int:
    """One token's keys and values in one layer."""
    return 2 * s["kv_heads"] * s["head_dim"] * torch.tensor([], dtype=cache_dtype).element_size()


def decode_bytes(s: dict[str, Any], batch: int, context: float, cache_dtype: torch.dtype = DTYPE) -> float:
    """Decode attention's floor traffic: each context's keys and values read once, the queries read and the
    outputs written."""
    query_bytes = s["heads"] * s["head_dim"] * torch.tensor([], dtype=DTYPE).element_size()
    return batch * context * kv_row_bytes(s, cache_dtype) + 2 * batch * query_bytes


def attention_kernels(s: dict[str, Any], report: Report) -> None:
    """Decode attention at each batch/context point and prefill attention on 16 chunks, with the launch options in
    force (a tuning file's when one applies: `attention_tuning`; `ember tune-kernels` sweeps them); then the K/V
    write."""
    tuning = tuning_for(DEVICE)
    shape = attention_shape(s)
    for batch, context in s["decode_points"]:
        inputs = DecodeInputs(shape, uniform(batch, context), DEVICE, DTYPE)
        splits = triton_attention.decode_splits(batch, s["kv_heads"], DEVICE, tuning)
        report.add("decode attention", f"b{batch} ctx{context} s{splits}", lambda: inputs.run(tuning), decode_bytes(s, batch, context))  # noqa: E501,B023  # fmt: skip
    ragged_decode(s, report, tuning)
    chunks = prefill_chunks(tiny=not CUDA)
    prefill = PrefillInputs(shape, chunks, DEVICE, DTYPE)
    elem = torch.tensor([], dtype=DTYPE).element_size()
    pairs = sum(length * prefix + length * (length + 1) / 2 for prefix, length in chunks)  # visible (query, key)
    flop = 4 * pairs * s["heads"] * s["head_dim"]
    moved = sum(prefix + length for prefix, length in chunks) * kv_row_bytes(s) + 2 * prefill.q.numel() * elem
    label = f"{len(chunks)} chunks, {prefill.q.shape[0]} rows, m{tuning.prefill_block_m} p{tuning.prefill_pages}"
    report.add("prefill attention", label, lambda: prefill.run(tuning), moved, flop)
    rows = prefill.q.shape[0]
    k = torch.randn(rows, s["kv_heads"], s["head_dim"], dtype=DTYPE, device=DEVICE)
    slots = torch.randperm(prefill.k_cache.shape[1] * BLOCK_SIZE, device=DEVICE)[:rows]
    report.add(
        "write kv", f"{rows} rows", lambda: triton_attention.write_kv(k, k, prefill.k_cache, prefill.v_cache, slots),
        2 * rows * kv_row_bytes(s),
    )  # fmt: skip


def ragged_decode(s: dict[str, Any], report: Report, tuning: AttentionTuning) -> None:
    """Decode attention over contexts as ragged as a serving batch's (uniform from 1/8 to 15/8 of the first
    decode point's context, the same mean, in random row order): a long context's program takes longer, and the
    kernel waits for the last of them. Its programs started longest first (the engine's order) and in row order,
    at 1x, 2x and 4x the split count in force (more splits per context even the programs out too). A simulation
    of 1,320 program slots with 2,048 programs of uniform lengths (b256, one split) gave 1.74x the ideal time in
    row order and 1.19x longest first."""
    batch, context = s["decode_points"][0]
    generator = torch.Generator().manual_seed(0)
    lens = torch.randint(context // 8, 2 * context - context // 8, (batch,), generator=generator)
    inputs = DecodeInputs(attention_shape(s), lens, DEVICE, DTYPE)
    mean = lens.sum().item() / batch
    default = triton_attention.decode_splits(batch, s["kv_heads"], DEVICE, tuning)
    for splits in sorted({default, 2 * default, 4 * default}):
        for label, ordered in (("longest first", True), ("row order", False)):
            shape = f"b{batch} ragged, mean ctx {mean:.0f} s{splits}, {label}"
            report.add("decode attention", shape, lambda: inputs.run(tuning, splits, ordered), decode_bytes(s, batch, mean))  # noqa: E501,B023  # fmt: skip


def decode_cache_variants(s: dict[str, Any], report: Report) -> None:
    """Decode attention over a float8 cache (`--kv-cache-dtype fp8`: half the bytes, its floor too) with its launch
    options in force, and at 1, 2 and 4 blocks a loop trip; then with larger blocks (more bytes per loop trip).
    Run last: on an H200 (Triton 3.6) the block-32 case at batch 256 x 1,500 once ended in an illegal memory
    access (an older kernel), which ends the CUDA context."""
    fp8 = torch.float8_e4m3fn
    tuning = tuning_for(DEVICE, fp8)
    for batch, context in s["decode_points"]:
        inputs = DecodeInputs(attention_shape(s), uniform(batch, context), DEVICE, DTYPE, fp8)
        for pages in sorted({tuning.decode_pages, 1, 2, 4}):
            paged = dataclasses.replace(tuning, decode_pages=pages)
            label = f"b{batch} ctx{context} fp8 cache p{pages}" + (
                " (in force)" if pages == tuning.decode_pages else ""
            )
            report.add("decode attention", label, lambda: inputs.run(paged), decode_bytes(s, batch, context, fp8))  # noqa: B023
    tuning = tuning_for(DEVICE)
    for batch, context in s["decode_points"]:
        for block_size in DECODE_BLOCK_SIZES if CUDA else DECODE_BLOCK_SIZES[:1]:
            inputs = DecodeInputs(attention_shape(s, block_size), uniform(batch, context), DEVICE, DTYPE)
            report.add("decode attention", f"b{batch} ctx{context} block {block_size}", lambda: inputs.run(tuning), decode_bytes(s, batch, context))  # noqa: E501,B023  # fmt: skip


def elementwise_kernels(s: dict[str, Any], report: Report) -> None:
    elem = torch.tensor([], dtype=DTYPE).element_size()
    hidden, inter, heads = s["hidden"], s["intermediate"], s["heads"] + s["kv_heads"]
    for rows in s["rows"]:
        x = torch.randn(rows, hidden, dtype=DTYPE, device=DEVICE)
        residual, weight = torch.randn_like(x), torch.randn(hidden, dtype=DTYPE, device=DEVICE)
        report.add("rms norm", f"{rows} x {hidden}", lambda: triton_elementwise.rms_norm(x, weight, 1e-6), 2 * x.numel() * elem)  # noqa: E501,B023  # fmt: skip
        report.add("add + rms norm", f"{rows} x {hidden}", lambda: triton_elementwise.add_rms_norm(x, residual, weight, 1e-6), 4 * x.numel() * elem)  # noqa: E501,B023  # fmt: skip
        qk = torch.randn(rows, heads, s["head_dim"], dtype=DTYPE, device=DEVICE)
        angles = torch.randn(rows, s["head_dim"] // 2, device=DEVICE)
        cos, sin = angles.cos(), angles.sin()
        report.add("rotary (q and k)", f"{rows} x {heads} x {s['head_dim']}", lambda: triton_elementwise.rotary_(qk, cos, sin), 2 * qk.numel() * elem + 2 * cos.numel() * 4)  # noqa: E501,B023  # fmt: skip
        qkv_kernels(s, rows, report)
        gate_up = torch.randn(rows, 2 * inter, dtype=DTYPE, device=DEVICE)
        report.add("silu and mul", f"{rows} x {inter}", lambda: triton_elementwise.silu_and_mul(gate_up), 3 * rows * inter * elem)  # noqa: E501,B023  # fmt: skip


def qkv_kernels(s: dict[str, Any], rows: int, report: Report) -> None:
    """Qwen3's attention inputs from its QKV rows: q/k norms, rotary and the K/V store as one kernel
    (`triton_qkv`), against the separate kernels it replaced (norms of copies of q and k, two rotations, the
    value copy and the cache write). Floor: the QKV rows read, the queries and the new K/V written."""
    from ember.kernels.triton_qkv import qkv_to_cache

    elem = torch.tensor([], dtype=DTYPE).element_size()
    heads, kv_heads, head_dim = s["heads"], s["kv_heads"], s["head_dim"]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=DTYPE, device=DEVICE)
    angles = torch.randn(rows, head_dim // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    q_weight, k_weight = torch.randn(2, head_dim, dtype=DTYPE, device=DEVICE)
    k_cache, v_cache = random_caches(attention_shape(s), -(-rows // BLOCK_SIZE), DEVICE, DTYPE)
    slots = torch.randperm(rows, device=DEVICE)

    def separate() -> None:
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = triton_elementwise.rms_norm(q.unflatten(1, (heads, head_dim)), q_weight, 1e-6)
        k = triton_elementwise.rms_norm(k.unflatten(1, (kv_heads, head_dim)), k_weight, 1e-6)
        triton_elementwise.rotary_(q, cos, sin)
        triton_elementwise.rotary_(k, cos, sin)
        triton_attention.write_kv(k, v.unflatten(1, (kv_heads, head_dim)), k_cache, v_cache, slots)

    def fused() -> None:
        qkv_to_cache(qkv, heads, cos, sin, k_cache, v_cache, slots, q_weight, k_weight, 1e-6)

    moved = qkv.numel() * elem + rows * (heads + 2 * kv_heads) * head_dim * elem + 2 * cos.numel() * 4
    shape = f"{rows} x {heads}+{kv_heads}+{kv_heads} x {head_dim}"
    report.add("qkv norms+rotary+store, fused", shape, fused, moved)
    report.add("qkv norms+rotary+store, apart", shape, separate, moved)


def sampler(s: dict[str, Any], report: Report) -> None:
    """The sampler on the logits of a full decode batch: greedy, temperature alone, with top-k and top-p, and
    with top-p alone (top-k/top-p through `triton_sampling` on CUDA), each random one also with its unseeded
    rows drawn by the Gumbel race (`sampler.RACE_UNSEEDED_ROWS`), and the race alone."""
    from ember.engine import sampler as sampling
    from ember.engine.request import Request
    from ember.engine.sampling_params import SamplingParams
    from ember.kernels import triton_sampling

    batch = s["decode_points"][0][0]
    logits = torch.randn(batch, s["vocab"], device=DEVICE)
    shape, moved = f"{batch} x {s['vocab']} fp32", logits.numel() * 4
    for label, params in (
        ("greedy", SamplingParams(temperature=0)),
        ("temperature 1", SamplingParams(temperature=1.0)),
        ("top-k 50, top-p 0.9", SamplingParams(temperature=0.8, top_k=50, top_p=0.9)),
        ("top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9)),
    ):
        requests = [Request(str(i), [1], params, [], 1) for i in range(batch)]
        for race in (False, True) if not params.greedy else (False,):
            sampling.RACE_UNSEEDED_ROWS = race
            name = f"sampler {label}" + (" (race)" if race else "")
            report.add(name, shape, lambda: sampling.sample(logits, requests), moved, wall=True)  # noqa: B023
    sampling.RACE_UNSEEDED_ROWS = True  # the default
    for block in (triton_sampling.RACE_BLOCK, 2048):
        report.add(f"gumbel race alone, {block}", shape, lambda: triton_sampling.gumbel_race(logits, 1, block), moved)  # noqa: B023


def top_k_top_p_filters(s: dict[str, Any], report: Report) -> None:
    """Top-k/top-p thresholds alone, by the sampler's way (`sampler.top_k_top_p_thresholds`: a window of the
    likeliest tokens, the radix search for the rows it does not cover), by the radix search for every row, and
    by a sort of the vocabulary, on flat logits (standard normal: a top-p nucleus of most of the vocabulary,
    beyond the window) and peaked ones (x 8: a nucleus of a few tokens); then the radix kernel over its tile size,
    warps and tiles per loop trip (default 512 x 8, 4 a trip). Floor: one read of the logits. Run last: it
    decides defaults, the decode steps before it the issue's figures."""
    from ember.engine.sampler import RowFilters, top_k_top_p_thresholds, window_thresholds
    from ember.kernels import triton_sampling

    batch, vocab = s["decode_points"][0][0], s["vocab"]
    flat = torch.randn(batch, vocab, device=DEVICE)
    shape, moved = f"{batch} x {vocab} fp32", flat.numel() * 4
    cases = (("top-k 50, top-p 0.9", 50, 0.9), ("top-p 0.9", 0, 0.9), ("top-k 50", 50, 1.0))
    for (label, k, p), (kind, logits) in itertools.product(cases, (("flat", flat), ("peaked", 8 * flat))):
        ks, ps = [k or vocab] * batch, [p] * batch
        k_rows, p_rows = torch.full((batch,), k or vocab, device=DEVICE), torch.full((batch,), p, device=DEVICE)
        filters = RowFilters.of(ks, ps, vocab, DEVICE)
        name = f"{label}, {kind}"
        report.add(f"{name}: sampler's", shape, lambda: top_k_top_p_thresholds(logits, ks, ps), moved, wall=True)  # noqa: B023  # fmt: skip
        report.add(f"{name}: radix", shape, lambda: triton_sampling.radix_thresholds(logits, k_rows, p_rows), moved, wall=True)  # noqa: E501,B023  # fmt: skip
        report.add(f"{name}: sort", shape, lambda: window_thresholds(logits, filters, vocab), moved, wall=True)  # noqa: B023  # fmt: skip
    k_rows, p_rows = torch.full((batch,), 50, device=DEVICE), torch.full((batch,), 0.9, device=DEVICE)
    # no spills with Triton 3.6 (the device's): 1,024 x 16 spills at 2 and 4 a trip, 512 x 8 at 1
    for block, warps, unroll in ((1024, 16, 1), (1024, 8, 1), (1024, 8, 2), (512, 8, 2), (512, 8, 4)):
        report.add(f"top-k + top-p: radix {block}x{warps}w u{unroll}", shape, lambda: triton_sampling.radix_thresholds(flat, k_rows, p_rows, block, warps, unroll), moved, wall=True)  # noqa: E501,B023  # fmt: skip


def decode_steps(s: dict[str, Any], report: Report) -> None:
    """Whole decode steps of the model (dummy weights): the CUDA-graph replay plus the logits (computed outside
    the graph), then the same with the inputs prepared and the argmax read back."""
    from ember.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
    from ember.engine.request import Request
    from ember.engine.sampling_params import SamplingParams
    from ember.engine.scheduler import ScheduledRequest
    from ember.models.loader import load_model

    config = {**DUMMY_PRESETS["qwen3-0.6b"], "model_type": "qwen3"}
    if not CUDA:
        config.update(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], head_dim=s["head_dim"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=512)  # fmt: skip
    config_dir = Path(tempfile.mkdtemp(prefix="ember-kernels-"))  # the dummy model's config.json
    (config_dir / "config.json").write_text(json.dumps(config))
    model = load_model(str(config_dir), "dummy", DTYPE, str(DEVICE)).model
    shutil.rmtree(config_dir)
    max_batch = max(batch for batch, _ in s["decode_points"])
    num_blocks = max(batch * -(-(context + 1) // BLOCK_SIZE) for batch, context in s["decode_points"])
    max_len = 2048 if CUDA else 512
    runner = ModelRunner(model, num_blocks, BLOCK_SIZE, str(DEVICE), DTYPE, max_batch, max_len)
    graphs = runner.decode_graphs
    assert graphs is not None
    per_token = kv_cache_bytes_per_block(runner.config, BLOCK_SIZE, DTYPE) / BLOCK_SIZE
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():  # as the engine steps: the graphs' outputs are inference tensors
        for batch, context in s["decode_points"]:
            blocks = -(-(context + 1) // BLOCK_SIZE)
            scheduled = []
            for i in range(batch):
                request = Request(str(i), [1] * (context + 1), SamplingParams(temperature=0), [], 1)
                request.block_ids = list(range(i * blocks, (i + 1) * blocks))
                scheduled.append(ScheduledRequest(request, context, 1))
            bucket = next(size for size in graphs.buckets if size >= batch)
            graphs.run(scheduled)
            moved = weights + batch * (context + 1) * per_token
            replay = graphs.graphs[bucket]
            report.add("decode step (graph + logits)", f"b{batch} ctx{context}", lambda: model.compute_logits(replay()[:batch]), moved, wall=True)  # noqa: E501,B023  # fmt: skip
            report.add("decode step (+ inputs, argmax)", f"b{batch} ctx{context}", lambda: runner.execute(scheduled), moved, wall=True)  # noqa: E501,B023  # fmt: skip
            if (batch, context) == s["decode_points"][0]:
                report.profiles[f"decode step b{batch} ctx{context}"] = step_profile(runner, scheduled)


def step_profile(runner: Any, scheduled: list[Any]) -> list[dict[str, Any]]:
    """Where one decode step's time goes: each kernel's time per step (summed over its launches) from the
    PyTorch profiler over a few eager steps (graphs off: a replay's kernels need not show in the profiler, and an
    eager step runs the same kernels). On the CPU fallback, the ops' own CPU times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps, graphs = 3, runner.decode_graphs
    runner.decode_graphs = None
    try:
        runner.execute(scheduled)
        with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                runner.execute(scheduled)
            if CUDA:
                torch.cuda.synchronize()
    finally:
        runner.decode_graphs = graphs
    device = DeviceType.CUDA if CUDA else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == device]
    rows = [
        {"kernel": e.key, "calls": e.count / steps,
         "us": (e.self_device_time_total if CUDA else e.self_cpu_time_total) / steps}
        for e in events
    ]  # fmt: skip
    rows.sort(key=lambda row: -row["us"])
    total = sum(row["us"] for row in rows) or 1.0
    print(f"\nkernels of one eager decode step ({total:.0f} us of {'GPU' if CUDA else 'CPU'} time a step):")
    for row in rows[:20]:
        share = 100 * row["us"] / total
        print(f"  {row['us']:9.1f} us {share:5.1f}% {row['calls']:6.0f} calls  {row['kernel'][:90]}")
    print(flush=True)
    return rows[:40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.environ.get("EMBER_RESULTS_DIR", "benchmarks/gpu/results"))
    args = parser.parse_args()
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    shape = FULL if CUDA else TINY
    card = torch.cuda.get_device_name() if CUDA else "CPU fallback (Triton interpreter), tiny shapes"
    copy, read, flops = device_rates()
    bandwidth = max(copy, read)  # the floor: the fastest rate memory was seen to give
    print(f"device: {card}; copy {copy / 1e12:.2f} TB/s (read plus written), sum {read / 1e12:.2f} TB/s (read), "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s\n")  # fmt: skip
    print(f"{'kernel':31s} {'shape':34s} {'us':>10s} {'floor us':>10s} {'floor/t':>9s}")
    report = Report(bandwidth, flops)
    out = {"device": card, "torch": torch.__version__, "triton": triton.__version__, "copy_bytes_per_s": copy,
           "read_bytes_per_s": read, "matmul_flop_per_s": flops, "rows": report.rows,
           "step_profiles": report.profiles}  # fmt: skip
    # in order of what the issue and the defaults need; the JSON is written after each, so a part cut short by
    # check.sh's time limit keeps what it measured. The decode steps load a model and enter inference mode
    # themselves; the float8 cache and block-size variants last: they may end the CUDA context (see there)
    sections = [attention_kernels, elementwise_kernels, sampler, decode_steps, top_k_top_p_filters,
                decode_cache_variants]  # fmt: skip
    for section in sections:
        with contextlib.nullcontext() if section is decode_steps else torch.inference_mode():
            section(shape, report)
        (results_dir / "kernels.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {results_dir / 'kernels.json'}")


if __name__ == "__main__":
    main()
