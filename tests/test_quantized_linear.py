"""The CPU's quantized linear kernels (GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K blocks; fp32
activations on x86 with AVX2 or AVX-512, bf16 on AVX512-BF16) against gguf-py's own dequantization (a GGUF model
served through them: `test_gguf_loader.py`)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ember.kernels import native
from ember.models import quantized
from ember.models.packed_linear import PackedLinear
from tests.test_gguf_loader import RANDOM_BLOCKS, random_blocks

pytestmark = pytest.mark.skipif(
    not quantized.kernels_available(torch.float32), reason="needs a C compiler and an x86 CPU with AVX2 or AVX-512"
)

FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS")  # super-blocks of 256 weights
DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not quantized.kernels_available(torch.bfloat16), reason="needs AVX512-BF16"),
    ),
]
# the kernel's sums against fp64 sums of the same products: bf16 output rounding, or fp32 summation order
TOLERANCE = {torch.bfloat16: {"rtol": 2**-8, "atol": 1e-3}, torch.float32: {"rtol": 1e-5, "atol": 1e-4}}


def gguf_weight(gguf_type: str, n: int, k: int, seed: int) -> tuple[quantized.QuantizedWeight, torch.Tensor]:
    """Random weights quantized by gguf-py (K-quants and IQ4: random blocks, which gguf-py cannot quantize to):
    (the kernel's split blocks, gguf-py's dequantization in fp32)."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[gguf_type]
    if qtype in RANDOM_BLOCKS:
        raw = random_blocks((n, k), qtype, rng)
    else:
        w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.02).astype(np.float32)
        raw = quantize(w, qtype)
    reference = torch.from_numpy(dequantize(raw, qtype).reshape(n, k).copy())
    return quantized.from_gguf_blocks(torch.from_numpy(raw), gguf_type), reference


def kernel_matmul(weight: quantized.QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The blocks' matmul called directly, for any row count (past its `max_rows`: the kernel for many rows where
    one runs)."""
    return quantized.QuantizedMatmul(quantized.QuantizedMatrix((weight,)), bias, x.dtype, many_rows=True)(x)


def check_exact_weights(gguf_type: str, dtype: torch.dtype, rows: int = 8) -> None:
    """Multiplying by identity rows reads each weight back alone: bit for bit gguf-py's value (in bf16, rounded).
    `rows` at a time: up to their `max_rows` the kernels for few rows, past it the kernel for many (where one runs)."""
    n, k = 40, 256 if gguf_type in K_QUANTS else 96  # K-quants: one super-block; else a pair of blocks and one
    weight, reference = gguf_weight(gguf_type, n, k, seed=1)
    identity = torch.eye(k, dtype=dtype)
    columns = torch.cat([kernel_matmul(weight, identity[r : r + rows], None) for r in range(0, k, rows)])
    assert torch.equal(columns.T, reference.to(dtype))


def multiplied(gguf_type: str, reference: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """The weights a kernel multiplies by: the loader's in the activations' dtype, but q6 blocks' (Q6_K's, Q3_K's)
    exact fp32 values in the bf16 kernel for few rows (it scales the sums of each 16 weights, not the weights)."""
    exact = (
        gguf_type in ("Q6_K", "Q3_K")
        and dtype == torch.bfloat16
        and (not quantized.many_row_kernel() or rows <= quantized.FEW_ROWS[quantized.many_row_kernel()])
    )
    return reference if exact else reference.to(dtype)


def check_matmul(gguf_type: str, rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    """The kernel's fp32 sums against the same products summed in fp64, with and without a bias."""
    weight, reference = gguf_weight(gguf_type, n, k, seed=rows)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    for b in (None, bias):
        expected = x.double() @ multiplied(gguf_type, reference, dtype, rows).double().T
        if b is not None:
            expected += b.double()
        out = kernel_matmul(weight, x, b)
        assert out.dtype == dtype and out.shape == (rows, n)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])


SHAPES = [(64, 224), (96, 576), (48, 768)]  # (N, K): odd and even block counts; K-quants need whole 256s
CASES = [(t, n, k) for t in FORMATS for n, k in SHAPES if t not in K_QUANTS or k % 256 == 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gguf_type", FORMATS)
def test_blocks_dequantize_to_the_loaders_weights_exactly(gguf_type: str, dtype: torch.dtype) -> None:
    check_exact_weights(gguf_type, dtype)


@pytest.mark.parametrize("gguf_type", ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "IQ4_XS"])
def test_an_embedding_held_as_blocks_looks_up_the_loaders_rows(gguf_type: str) -> None:
    weight, reference = gguf_weight(gguf_type, 64, 512, seed=5)
    ids = torch.tensor([[3, 0, 63], [17, 17, 5]])
    looked_up = quantized.QuantizedEmbedding(weight, torch.bfloat16)(ids)
    assert looked_up.shape == (2, 3, 512) and torch.equal(looked_up, reference.to(torch.bfloat16)[ids])


@pytest.mark.parametrize("gguf_type", FORMATS)
def test_dense_weights_from_the_blocks_are_gguf_pys_bit_for_bit(gguf_type: str) -> None:
    """A GGUF model's dense weights (GPU, fp32, a kept copy) come from its blocks, natively and where that is not
    built in PyTorch: both are gguf-py's dequantization, every bit (several rows of several blocks, a row's
    blocks in order)."""
    weight, reference = gguf_weight(gguf_type, 40, 512, seed=3)
    assert torch.equal(quantized.dequantize(weight), reference)
    assert torch.equal(quantized.dequantize_in_torch(weight), reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])  # 5, 8 and 11 span register groups of 4 and 8 rows
@pytest.mark.parametrize(("gguf_type", "n", "k"), CASES)
def test_quantized_matmul_matches_dequantized_weights(
    gguf_type: str, rows: int, n: int, k: int, dtype: torch.dtype
) -> None:
    check_matmul(gguf_type, rows, n, k, dtype)


@pytest.mark.usefixtures("many_row_kernel")
@pytest.mark.parametrize("gguf_type", FORMATS)
def test_many_row_kernel_dequantizes_to_the_loaders_weights_exactly(gguf_type: str) -> None:
    """The kernel for many rows (past FEW_ROWS rows) multiplies by the loader's bf16 weights, Q6_K's included."""
    check_exact_weights(gguf_type, torch.bfloat16, rows=16)


# rows, AMX: one group of 16 and a part of one, whole pairs of groups and an odd group over; AVX512-BF16: passes
# of 12 rows and the rest (9, 4, ...); 520 takes the wide tiles (and AMX its weights in pairs, not in rows).
# N: 40 leaves a tile of 8 features over its 32, 200 a part-filled group of 16 past 3 whole tiles of 64 (or 128).
@pytest.mark.usefixtures("many_row_kernel")
@pytest.mark.parametrize(("rows", "n"), [(9, 40), (16, 200), (33, 40), (64, 200), (520, 200)])
@pytest.mark.parametrize("gguf_type", ["Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K", "IQ4_XS"])
def test_many_row_kernel_matches_dequantized_weights(gguf_type: str, rows: int, n: int) -> None:
    check_matmul(gguf_type, rows, n, 256, torch.bfloat16)


@pytest.mark.usefixtures("many_row_kernel")
def test_the_many_row_kernel_fills_each_segments_columns() -> None:
    """A fused projection of Q4_K and Q6_K parts past FEW_ROWS rows: each part's columns and bias, with a tile
    of the Q4_K part's features cut short by the segment's end."""
    types = ["Q4_K", "Q6_K"]
    parts = [gguf_weight(t, n, 512, seed) for seed, (t, n) in enumerate(zip(types, [72, 48], strict=True))]
    matrix = quantized.stack_rows([w for w, _ in parts])
    assert matrix is not None and matrix.kernels == "q4+q6"
    reference = torch.cat([r.to(torch.bfloat16) for _, r in parts]).double()
    x = torch.randn(21, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bias = torch.randn(120).to(torch.bfloat16)
    out = quantized.QuantizedMatmul(matrix, bias, torch.bfloat16, many_rows=True)(x)
    torch.testing.assert_close(out.double(), x.double() @ reference.T + bias.double(), **TOLERANCE[torch.bfloat16])


def cpu_has_avx2_and_fma() -> bool:
    if platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not cpu_has_avx2_and_fma(), reason="runs Ember's kernels as built for an x86 AVX2 CPU")
def test_avx2_build_of_the_fp32_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels as built for a CPU with AVX2 but no AVX-512 (8-lane variant, groups of 4 rows), compiled
    and run here: the same checks as the build for this CPU."""
    monkeypatch.setattr(native, "FLAGS", [f if f != "-march=native" else "-march=x86-64-v3" for f in native.FLAGS])
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    try:
        library = native.load()
        assert library is not None and not hasattr(library, "quantized_linear_q4_bf16")
        for gguf_type in FORMATS:
            check_exact_weights(gguf_type, torch.float32)
        for gguf_type, n, k in CASES:
            for rows in (1, 3, 5):
                check_matmul(gguf_type, rows, n, k, torch.float32)
    finally:
        native.load.cache_clear()  # the next caller loads this CPU's build again


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linear_uses_the_blocks_for_few_rows_only(dtype: torch.dtype) -> None:
    """Up to the blocks' `max_rows` (MAX_ROWS; with a kernel for many rows, its FEW_ROWS) rows go through the
    blocks, more through oneDNN's matmul; both compute one linear."""
    weight, reference = gguf_weight("Q4_1", 128, 256, seed=3)
    linear = torch.nn.Linear(256, 128, bias=False).to(dtype)
    linear.weight.data.copy_(reference)
    packed = PackedLinear(linear, batch_hint=64, blocks=quantized.QuantizedMatrix((weight,)))
    calls = []
    assert packed.small_steps is not None
    call, max_rows = packed.small_steps.calls[0], packed.small_steps.max_rows
    kernel = call.function
    call.function = lambda *args: calls.append(args[6]) or kernel(*args)  # the row count, then the call
    x = torch.randn(max_rows + 1, 256).to(dtype)
    few, many = packed(x[:max_rows]), packed(x)
    assert calls == [max_rows]
    torch.testing.assert_close(few.float(), many[:max_rows].float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_fused_projection_of_mixed_formats_fills_one_output(dtype: torch.dtype) -> None:
    """As Q4_K_M stores QKV: q and k in Q4_K (joined into one segment), v in Q6_K; each segment's kernel writes
    its own columns of every row, with its part of the bias."""
    types = ["Q4_K", "Q4_K", "Q6_K"]
    parts = [gguf_weight(t, n, 512, seed) for seed, (t, n) in enumerate(zip(types, [64, 32, 48], strict=True))]
    matrix = quantized.stack_rows([w for w, _ in parts])
    assert matrix is not None and matrix.kernels == "q4+q6" and matrix.shape == (144, 512)
    reference = torch.cat([multiplied(t, r, dtype, 5) for t, (_, r) in zip(types, parts, strict=True)]).double()
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = torch.randn(144).to(dtype)
    out = quantized.QuantizedMatmul(matrix, bias, dtype, many_rows=True)(x)
    torch.testing.assert_close(out.double(), x.double() @ reference.T + bias.double(), **TOLERANCE[dtype])


def test_a_dequantized_copy_is_kept_only_where_it_pays_and_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a kernel for many rows the copy serves larger steps; AMX's never needs it; AVX512-BF16's keeps it
    while it takes at most a quarter of the memory available; EMBER_KEEP_DEQUANTIZED_WEIGHTS overrides."""
    monkeypatch.delenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", raising=False)
    keep, gib = quantized.keep_dequantized_copy, 1 << 30
    assert keep(None, 10 * gib, 16 * gib) and not keep("amx", gib, 16 * gib)
    assert keep("dpbf16", 4 * gib, 16 * gib) and not keep("dpbf16", 14 * gib, 16 * gib)
    monkeypatch.setenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", "1")
    assert keep("amx", gib, 16 * gib) and keep("dpbf16", 14 * gib, 16 * gib)
    monkeypatch.setenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", "0")
    assert not keep("dpbf16", gib, 16 * gib) and keep(None, gib, 16 * gib)
