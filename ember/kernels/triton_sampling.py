"""Top-k / top-p filtering on the GPU without sorting the vocabulary (the CUDA path of the sampler).

A full sort of 256 x 152K logits costs milliseconds on an H100, the size of a decode step. Each row's kept set
is instead found as a threshold: the smallest logit kept. It is found exactly by a radix search over the logits'
32-bit patterns, mapped to unsigned keys that sort as the floats do, 4 bits per pass: each pass histograms, over
the tokens still in range, their next 4 key bits by count (top-k) or by probability mass (top-p), and picks the
highest bin where the kept count or mass reaches its target. Eight passes fix a key; a row with both filters
makes a pass for its maximum and eight for each filter. Nothing waits for the host.

Semantics are those of `ember.engine.sampler.top_k_top_p_thresholds`, which runs this search for the rows whose
kept set its window of likeliest tokens does not hold: top-p applies to the renormalized top-k distribution and
keeps each token whose higher-ranked mass is below p, so the most likely token always stays; logits tied with the
threshold are all kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits per tile of a pass, warps per row, and tiles per loop trip (loaded before any is binned). Each thread keeps
# 16 bins for each of its logits of a tile. On an H200 (2026-12-04) 1,024 x 16 warps, one tile a trip, took ~0.5 ms
# a pass at 256 x 151,936: latency bound, one 16-warp program per SM (120 registers a thread), one 8-byte load in
# flight per thread, against ~0.13 ms of its own instructions. 512 x 8 warps with 4 tiles a trip keeps 2 logits a
# thread and puts 4 loads in flight (the sm_90 SASS issues them back to back): 201 registers, no spills with the
# device's Triton 3.6 (at 16 warps a thread may have 128 registers: 2 or 4 tiles a trip spill there). Not yet
# timed: kernel_times.py sweeps these against the measured 1,024 x 16 x 1.
BLOCK = 512
NUM_WARPS = 8
UNROLL = 4


@triton.jit
def _sort_key(x):
    """fp32 -> uint32 whose unsigned order is the floats' order: positives get the sign bit set, negatives are
    bit-flipped (a larger magnitude then gives a smaller key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # not `~`: Triton 3.6's interpreter


@triton.jit
def _from_sort_key(key):
    bits = tl.where((key >> 31) == 1, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bin(partial, x, in_row, fixed, prefix, floor, row_max, shift, BY_MASS: tl.constexpr):
    """`partial` [tile, 16] plus the tile's logits `x` in range (in the row, matching the key bits fixed so far,
    at or above the floor), each in the bin of its key's 4 bits at `shift`: a count, or `exp(x - row_max)`."""
    key = _sort_key(x)
    selected = in_row & ((key & fixed) == prefix) & (key >= floor)
    onehot = (((key >> shift) & 15)[:, None] == tl.arange(0, 16)[None, :]) & selected[:, None]
    if BY_MASS:
        return partial + tl.where(onehot, tl.exp(x - row_max)[:, None], 0.0)
    return partial + onehot.to(tl.float32)


@triton.jit
def _radix_search(
    row, vocab, floor, row_max, target, BY_MASS: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr
):  # fmt: skip
    """The largest key K such that the tokens with keys >= K (and >= floor) weigh at least `target` (a count, or
    a fraction of the in-floor probability mass when BY_MASS). Where rounding leaves every bin short (a mass
    target at the total), it takes the lowest bin, keeping everything in range."""
    bins = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.uint32)
    fixed = tl.zeros([], dtype=tl.uint32)  # the key bits already decided
    above = tl.zeros([], dtype=tl.float32)  # weight of the in-range tokens in bins above the prefix
    goal = target
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        partial = tl.zeros([BLOCK, 16], dtype=tl.float32)  # per lane: summed across lanes once per pass
        # UNROLL tiles a trip, all loaded before any is binned: UNROLL loads in flight per thread
        for start in range(0, vocab, BLOCK * UNROLL):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row + cols, mask=cols < vocab, other=float("-inf"))
            if UNROLL >= 2:
                x2 = tl.load(row + cols + BLOCK, mask=cols + BLOCK < vocab, other=float("-inf"))
            if UNROLL >= 4:
                x3 = tl.load(row + cols + 2 * BLOCK, mask=cols + 2 * BLOCK < vocab, other=float("-inf"))
                x4 = tl.load(row + cols + 3 * BLOCK, mask=cols + 3 * BLOCK < vocab, other=float("-inf"))
            partial = _bin(partial, x, cols < vocab, fixed, prefix, floor, row_max, shift, BY_MASS)
            if UNROLL >= 2:
                partial = _bin(partial, x2, cols + BLOCK < vocab, fixed, prefix, floor, row_max, shift, BY_MASS)
            if UNROLL >= 4:
                partial = _bin(partial, x3, cols + 2 * BLOCK < vocab, fixed, prefix, floor, row_max, shift, BY_MASS)
                partial = _bin(partial, x4, cols + 3 * BLOCK < vocab, fixed, prefix, floor, row_max, shift, BY_MASS)
        weights = tl.sum(partial, axis=0)
        if BY_MASS and level == 0:
            goal = target * tl.sum(weights, axis=0)  # p of the mass at or above the floor
        at_or_above = above + tl.sum(weights, axis=0) - tl.cumsum(weights, axis=0) + weights
        digit = tl.max(tl.where(at_or_above >= goal, bins, 0), axis=0).to(tl.uint32)
        above += tl.sum(tl.where(bins > digit, weights, 0.0), axis=0)
        prefix |= digit << shift
        fixed |= tl.full([], 15, dtype=tl.uint32) << shift
    return prefix


@triton.jit
def _threshold_kernel(logits, row_stride, vocab, top_k, top_p, out, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """One program per row: its smallest kept logit (-inf where the row has no filter)."""
    r = tl.program_id(0)
    row = logits + r.to(tl.int64) * row_stride
    k = tl.load(top_k + r)
    p = tl.load(top_p + r)
    threshold = tl.full([], 0, dtype=tl.uint32)
    if k < vocab:
        threshold = _radix_search(row, vocab, threshold, 0.0, k.to(tl.float32), False, BLOCK, UNROLL)
    if p < 1.0:
        row_max = tl.full([], float("-inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            row_max = tl.maximum(row_max, tl.max(tl.load(row + cols, mask=cols < vocab, other=float("-inf"))))
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        threshold = _radix_search(row, vocab, threshold, row_max, p, True, BLOCK, UNROLL)
    # 0x007FFFFF is the key of -inf, the smallest threshold that is a number (key 0 would be a NaN)
    tl.store(out + r, _from_sort_key(tl.maximum(threshold, 0x007FFFFF)))


def radix_thresholds(
    logits: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    unroll: int = UNROLL,
) -> torch.Tensor:
    """[rows] float32: each row's smallest kept logit under its top-k (`top_ks` [rows] on the device: the
    vocabulary's size for none) and top-p (`top_ps` [rows]: 1.0 or more for none); -inf where neither applies.
    `block`, `num_warps`, `unroll` (1, 2 or 4): the kernel's tile, warps and tiles per loop trip."""
    logits = logits.float().contiguous()  # no copy for the sampler's own logits
    rows, vocab = logits.shape
    ks = top_ks.to(torch.int32).clamp(max=vocab)
    ps = top_ps.to(torch.float32)
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _threshold_kernel[(rows,)](
        logits, logits.stride(0), vocab, ks, ps, out, BLOCK=block, UNROLL=unroll, num_warps=num_warps
    )
    return out


# Logits per tile and warps of the Gumbel race: one program per row, a row of 151,936 logits in 38 tiles. At 4,096
# x 8 warps each thread has four 16-byte loads in flight a trip, at 79 registers (2,048: two, at 48), no spills.
RACE_BLOCK = 4096
RACE_WARPS = 8


@triton.jit
def _gumbel_race_kernel(logits, row_stride, vocab, seed, out, BLOCK: tl.constexpr):
    """One program per row: the index of the largest logit plus Gumbel noise, which is a draw from the row's
    softmax (a -inf logit is never drawn). One pass over the logits, the noise made in registers (Philox)."""
    r = tl.program_id(0)
    row = logits + r.to(tl.int64) * row_stride
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < vocab, other=float("-inf"))
        uniform = tl.rand(seed, r * vocab + cols)  # [0, 1): 0 gives -inf noise, never drawn
        score = x - tl.log(-tl.log(uniform))
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, axis=0)
    tl.store(out + r, tl.min(tl.where(best == top, best_col, vocab), axis=0))


def gumbel_race(logits: torch.Tensor, seed: int, block: int = RACE_BLOCK) -> torch.Tensor:
    """[rows] int64: one token per row drawn from softmax(logits), by the Gumbel-max race, with Philox noise
    from `seed` (the same seed and logits give the same tokens). Rows of -inf only give token 0."""
    logits = logits.float().contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _gumbel_race_kernel[(rows,)](logits, logits.stride(0), vocab, seed, out, BLOCK=block, num_warps=RACE_WARPS)
    return out
