"""GGUF-quantized linear weights, multiplied in their blocks for decode steps of a few rows (CPU).

At batch 1 a decode step's linears read every weight once, so their time is the weights' bytes over memory
bandwidth. A GGUF file's Q4 blocks are 5/8 of a byte per weight against bf16's 2: the native kernel reads
the blocks and dequantizes them in registers to the very values the loader produces (fp32, or those rounded
to bf16), so results differ from oneDNN's matmul only in summation order. Larger steps are compute bound: in
bf16 a second kernel dequantizes a tile of weights at a time into cache and multiplies it there, so the model
needs no other copy of those weights (`QuantizedLinear`: a GGUF model's memory is about its file's size). With
AMX it runs within 3-8% of oneDNN on a dequantized copy, and no copy is kept; with AVX512-BF16's vdpbf16ps it is
slower than oneDNN's packed copy at 16-32 rows, which is kept while small next to the memory available
(`keep_dequantized_copy`). In fp32 larger steps stay on oneDNN, and the model keeps both copies.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn

from ember.config import available_memory_bytes
from ember.kernels import native

# GGUF type -> (weights, bytes) per block; K-quant super-blocks are split into blocks of 32 weights at load
GGUF_BLOCKS = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q3_K": (256, 110),  # as q6 blocks (exact, 8 bits a weight instead of 3.4)
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
    "Q2_K": (256, 84),
}
BLOCK = 32
# Above this many rows a step's matmul is compute bound and oneDNN's kernel is about as fast or faster
# (measured on an AVX512-BF16 EPYC, and fp32 also as an AVX2 build: `benchmarks/NOTES.md`, steps 20 and 21).
MAX_ROWS = {torch.bfloat16: 8, torch.float32: 8}
# Where a kernel for many rows runs (`many_row_kernel()`), it takes over from the few-row kernels past this many
# rows. AMX (since its tiles' blocks arrive while it computes, `benchmarks/NOTES.md` step 36): Qwen3-0.6B's 28 layers
# of Q4 blocks at 4 / 5 / 6 rows 32.2 / 35.3 / 41.9 ms against AMX's 34.5 / 34.0 / 32.3 (Q6: 39.5 / 45.2 / 51.0
# against 49.0 / 49.5 / 51.3); whole steps of a Qwen3-0.6B Q4_K_M at batch 6: AMX 61.0, 64.3 ms, few-row 65.7, 71.6.
FEW_ROWS = {"amx": 5, "dpbf16": 8}
SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclass
class QuantizedWeight:
    """A linear weight [N, K] as the kernel reads it: per output feature, K / 32 blocks."""

    kernel: str  # "q4" (Q4_0, Q4_1, Q4_K), "q5" (Q5_0, Q5_1, Q5_K), "q6" (Q6_K, Q3_K), "q8" (Q8_0), "iq4" (IQ4_*), "q2"
    quants: torch.Tensor  # uint8 [N, K / 32, 8, 16, 20, 24 or 32]
    scales: torch.Tensor  # fp32 [N, K / 32] (q6: [N, K / 16]; q2: [N, K / 8], each block's scales then mins)
    mins: torch.Tensor | None  # fp32 [N, K / 32], or None (q6, q8, iq4, q2)

    @property
    def shape(self) -> tuple[int, int]:
        return self.quants.shape[0], self.quants.shape[1] * BLOCK


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block, as fp32."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16)[..., 0].float()


def _shifted(values: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """`values` [..., n] right-shifted by each of `shifts`: [..., len(shifts), n]."""
    return values.unsqueeze(-2) >> torch.tensor(shifts, dtype=torch.uint8)[:, None]


def _weight(kernel: str, quants: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> QuantizedWeight:
    rows = quants.shape[0]
    contiguous_mins = None if mins is None else mins.reshape(rows, -1).contiguous()
    return QuantizedWeight(kernel, quants.contiguous(), scales.reshape(rows, -1).contiguous(), contiguous_mins)


def from_gguf_blocks(raw: torch.Tensor, gguf_type: str) -> QuantizedWeight:
    """Split a GGUF tensor's rows of blocks (uint8 [N, K / per_block * block bytes]) into quants, scales and
    mins, with every weight's `scale * q + min` exactly the fp32 value of gguf-py's dequantization.

    Q4_0's weights are `d * (q - 8)`, Q5_0's `d * (q - 16)`: stored as min `-8 d` (`-16 d`), which keeps
    `d * q + min` exact in fp32. The GGUF conversion caches what this returns: a change to these formats must bump
    `loader.GGUF_CACHE_VERSION`, or older caches would hand the kernels blocks in the former layout. In PyTorch:
    4x faster than NumPy here (a conversion's time is mostly this).
    """
    _, block_bytes = GGUF_BLOCKS[gguf_type]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    if gguf_type in ("Q4_K", "Q5_K"):
        return _from_k_quant(blocks, bits=int(gguf_type[1]))
    if gguf_type == "Q6_K":
        return _from_q6_k(blocks)
    if gguf_type == "Q3_K":
        return _from_q3_k(blocks)
    if gguf_type == "IQ4_XS":
        return _from_iq4_xs(blocks)
    if gguf_type == "Q2_K":
        return _from_q2_k(blocks)
    d = _half(blocks, 0)
    if gguf_type == "IQ4_NL":
        return _weight("iq4", blocks[..., 2:], d, None)
    if gguf_type == "Q8_0":
        return _weight("q8", blocks[..., 2:], d, None)
    mins = {"Q4_0": -8.0 * d, "Q5_0": -16.0 * d}.get(gguf_type)
    first = 2 if mins is not None else 4  # Q4_1 and Q5_1 store their min after d
    mins = _half(blocks, 2) if mins is None else mins
    if gguf_type.startswith("Q4"):
        return _weight("q4", blocks[..., first:], d, mins)
    nibbles, high_bits = blocks[..., first + 4 :], blocks[..., first : first + 4]  # Q5: 32 fifth bits, then nibbles
    return _weight("q5", torch.cat([nibbles, high_bits], dim=-1), d, mins)


def _nibbles(values: torch.Tensor) -> torch.Tensor:
    """Weights [..., 32] (their low 4 bits) as q4's 16 bytes: weight j < 16 in byte j's low nibble, j + 16 high."""
    return (values[..., :16] & 0x0F) | ((values[..., 16:] & 0x0F) << 4)


def _from_k_quant(blocks: torch.Tensor, bits: int) -> QuantizedWeight:
    """Q4_K and Q5_K: super-blocks of 256 weights, 8 sub-blocks of 32 with 6-bit scales and mins under the
    super-block's fp16 `d` and `dmin`. Each sub-block becomes a q4 (q5) block: scale `d * sc` and min `-dmin * m`
    are exact in fp32 (11 times 6 bits); its nibbles are the low or high halves of 32 bytes, and Q5_K's fifth
    bits bit i of 32 bytes for sub-block i."""
    from gguf.quants import Q4_K

    rows, supers, _ = blocks.shape
    sc, m = (torch.from_numpy(a) for a in Q4_K.get_scale_min(blocks[:, :, 4:16].reshape(-1, 12).numpy()))
    scales = _half(blocks, 0)[..., None] * sc.reshape(rows, supers, 8).float()
    mins = -(_half(blocks, 2)[..., None] * m.reshape(rows, supers, 8).float())
    first = 16 if bits == 4 else 48  # Q5_K: 32 bytes of fifth bits before the nibbles
    chunks = blocks[:, :, first:].reshape(rows, supers, 4, 32)  # sub-block 2c: low nibbles of chunk c, 2c+1 high
    values = (_shifted(chunks, [0, 4]) & 0x0F).reshape(rows, -1, 32)
    if bits == 4:
        return _weight("q4", _nibbles(values), scales, mins)
    fifth = (_shifted(blocks[:, :, 16:48], list(range(8))) & 1).reshape(rows, -1, 4, 8)  # sub-block i: bits i
    high_bits = (fifth << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)  # bit j: weight j's
    return _weight("q5", torch.cat([_nibbles(values), high_bits], dim=-1), scales, mins)


def _from_q6_k(blocks: torch.Tensor) -> QuantizedWeight:
    """Q6_K: super-blocks of 256 weights, 16 sub-blocks of 16 with int8 scales under the super-block's fp16 `d`,
    each weight 6 bits (a nibble in `ql`, two high bits in `qh`) less 32. Each 32 weights become a q6 block with
    two scales `d * sc`, exact in fp32."""
    rows, supers, _ = blocks.shape
    nibbles = (_shifted(blocks[..., :128].reshape(rows, supers, 2, 64), [0, 4]) & 0x0F).reshape(rows, -1, 32)
    high = (_shifted(blocks[..., 128:192].reshape(rows, supers, 2, 32), [0, 2, 4, 6]) & 0x03).reshape(rows, -1, 32)
    scales = _half(blocks, 208)[..., None] * blocks[..., 192:208].contiguous().view(torch.int8).float()
    return _weight("q6", _q6_quants(nibbles | high << 4), scales, None)


def _q6_quants(values: torch.Tensor) -> torch.Tensor:
    """6-bit weights [..., 32] as q6's 24 bytes: their nibbles as q4's, then their high bit pairs."""
    return torch.cat([_nibbles(values), _bit_pairs(values >> 4)], dim=-1)


def _bit_pairs(values: torch.Tensor) -> torch.Tensor:
    """2-bit values [..., 32] as 8 bytes: byte i holds values i, i + 8, i + 16, i + 24 in bits 0-1, 2-3, 4-5, 6-7."""
    pairs = values.unflatten(-1, (4, 8))
    return pairs[..., 0, :] | pairs[..., 1, :] << 2 | pairs[..., 2, :] << 4 | pairs[..., 3, :] << 6


def _from_q2_k(blocks: torch.Tensor) -> QuantizedWeight:
    """Q2_K: super-blocks of 256 weights, 16 sub-blocks of 16 with 4-bit scales and mins under the super-block's
    fp16 `d` and `dmin`, each weight 2 bits. Each 32 weights become a q2 block: its bit pairs, and its halves'
    scales `d * sc` then mins `-dmin * m`, exact in fp32 (11 times 4 bits)."""
    rows, supers, _ = blocks.shape
    values = (_shifted(blocks[..., 16:80].reshape(rows, supers, 2, 32), [0, 2, 4, 6]) & 0x03).reshape(rows, -1, 32)
    scales = (_half(blocks, 80)[..., None] * (blocks[..., :16] & 0x0F).float()).reshape(rows, -1, 2)
    mins = -(_half(blocks, 82)[..., None] * (blocks[..., :16] >> 4).float()).reshape(rows, -1, 2)
    return _weight("q2", _bit_pairs(values), torch.cat([scales, mins], dim=-1), None)


def _from_q3_k(blocks: torch.Tensor) -> QuantizedWeight:
    """Q3_K: super-blocks of 256 weights, 16 sub-blocks of 16 with 6-bit scales (less 32) under the super-block's
    fp16 `d`, each weight 2 bits in `qs` and a bit in `hmask` whose absence subtracts 4 (-4..3). Each 32 weights
    become a q6 block of values q + 32 (28..35) with two scales `d * sc`: exact in fp32, as gguf-py's products."""
    rows, supers, _ = blocks.shape
    low = _shifted(blocks[..., 32:96].reshape(rows, supers, 2, 32), [0, 2, 4, 6]) & 0x03  # weight 128h + 32s + l
    high = _shifted(blocks[..., :32], list(range(8))) & 1  # weight 32b + l
    values = (low.reshape(rows, -1, 32) | high.reshape(rows, -1, 32) << 2) + 28
    packed = blocks[..., 96:108]
    low_scales = (_shifted(packed[..., :8], [0, 4]) & 0x0F).reshape(rows, supers, 16)  # scale 8h + i: byte i
    high_scales = (_shifted(packed[..., 8:12], [0, 2, 4, 6]) & 0x03).reshape(rows, supers, 16)  # 4s + i: byte 8 + i
    scales = _half(blocks, 108)[..., None] * ((low_scales | high_scales << 4).float() - 32)
    return _weight("q6", _q6_quants(values), scales, None)


IQ4_GRID = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.int8)


def _from_iq4_xs(blocks: torch.Tensor) -> QuantizedWeight:
    """IQ4_XS: super-blocks of 256 weights, 8 sub-blocks of 32 with 6-bit scales (less 32; low nibbles in 4 bytes,
    high bit pairs in a 16-bit word) under the super-block's fp16 `d`, weights as IQ4_NL's (4-bit indices into
    `IQ4_GRID`, nibbles as q4's). Each sub-block becomes an iq4 block with scale `d * sc`: its products with the
    grid's values stay exact in fp32 (11 + 6 + 7 significant bits), as in gguf-py."""
    rows, supers, _ = blocks.shape
    low = (_shifted(blocks[..., 4:8], [0, 4]).transpose(-1, -2) & 0x0F).reshape(rows, supers, 8)  # 2i + h: byte i
    word = blocks[..., 2:4].contiguous().view(torch.int16).to(torch.int32)
    high = (word >> torch.arange(0, 16, 2, dtype=torch.int32)) & 0x03  # sub-block i: bits 2i, 2i + 1
    scales = _half(blocks, 0)[..., None] * ((low.to(torch.int32) | high << 4).float() - 32)
    return _weight("iq4", blocks[..., 8:].reshape(rows, -1, 16), scales, None)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The weights [N, K] in fp32, bit for bit gguf-py's dequantization (each `scale * q` is exact, then one
    rounding adds the min): how a GGUF model gets the dense weights its blocks do not serve (a GPU, fp32 on the
    CPU, the copy `keep_dequantized_copy` keeps), without the conversion storing them. Native where built."""
    library = native.load()
    function = getattr(library, f"dequantize_{weight.kernel}_f32", None) if library is not None else None
    if function is None:
        return dequantize_in_torch(weight)
    out = torch.empty(weight.shape, dtype=torch.float32)
    mins = None if weight.mins is None else weight.mins.data_ptr()
    function(weight.quants.data_ptr(), weight.scales.data_ptr(), mins, out.data_ptr(), *weight.shape)
    return out


def dequantize_in_torch(weight: QuantizedWeight) -> torch.Tensor:
    """`dequantize` where the native one is not built (no C compiler, not x86)."""
    quants, scales = weight.quants, weight.scales[..., None]
    rows, blocks, _ = quants.shape
    out = torch.empty((rows, blocks, BLOCK), dtype=torch.float32)
    if weight.kernel == "q8":
        return torch.mul(quants.view(torch.int8), scales, out=out).reshape(rows, -1)
    if weight.kernel == "q2":  # each half of 16 weights: its scale, then its min
        values = (_shifted(quants, [0, 2, 4, 6]) & 0x03).view(rows, blocks, 2, 16)
        halves = weight.scales.view(rows, blocks, 4, 1)
        return torch.addcmul(halves[:, :, 2:], values, halves[:, :, :2], out=out.view(rows, blocks, 2, 16)).view(
            rows, -1
        )
    nibbles = quants[..., :16]
    values = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1)  # weight j < 16: byte j's low nibble, j + 16 high
    if weight.kernel == "iq4":
        return torch.mul(IQ4_GRID[values.long()], scales, out=out).reshape(rows, -1)
    if weight.kernel == "q5":  # bit j of the word after the nibbles: weight j's fifth
        fifth = quants[..., 16:20, None] >> torch.arange(8, dtype=torch.uint8) & 1
        values |= fifth.reshape(rows, blocks, BLOCK) << 4
    elif weight.kernel == "q6":  # byte i of the 8 after the nibbles: high bit pairs of weights i, i + 8, i + 16, i + 24
        pairs = _shifted(quants[..., 16:24], [0, 2, 4, 6]) & 0x03
        values |= pairs.reshape(rows, blocks, BLOCK) << 4
        centered = (values.view(torch.int8) - 32).view(rows, -1, BLOCK // 2)  # a scale per 16 weights
        return torch.mul(centered, scales, out=out.view(rows, -1, BLOCK // 2)).reshape(rows, -1)
    torch.mul(values, scales, out=out)
    assert weight.mins is not None
    return out.add_(weight.mins[..., None]).reshape(rows, -1)


@dataclass
class QuantizedMatrix:
    """A linear's weight [N, K] as row segments of blocks, each in one format: a fused projection's parts may
    differ (Q4_K_M files store q and k in Q4_K, v in Q6_K); each segment's kernel writes its own columns."""

    segments: tuple[QuantizedWeight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(s.shape[0] for s in self.segments), self.segments[0].shape[1]

    @property
    def kernels(self) -> str:
        return "+".join(s.kernel for s in self.segments)


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedMatrix | None:
    """The weights of a fused projection (q/k/v, gate/up) stacked by rows, consecutive parts of one format
    joined; None if their widths differ."""
    if len({p.shape[1] for p in parts}) != 1:
        return None
    runs = [list(group) for _, group in itertools.groupby(parts, key=lambda p: (p.kernel, p.mins is None))]
    return QuantizedMatrix(tuple(_concat(run) for run in runs))


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])  # type: ignore[misc]
    return QuantizedWeight(
        parts[0].kernel, torch.cat([p.quants for p in parts]), torch.cat([p.scales for p in parts]), mins
    )


def kernels_available(dtype: torch.dtype) -> bool:
    """Whether the quantized kernels for activations of `dtype` run here: fp32 on x86 CPUs with AVX-512 or AVX2,
    bf16 on AVX512-BF16. EMBER_DISABLE_QUANTIZED_KERNELS=1 turns them off (for A/B comparisons)."""
    library = native.load()
    return (
        library is not None
        and dtype in SUFFIX
        and hasattr(library, f"quantized_linear_q4_{SUFFIX[dtype]}")
        and not os.environ.get("EMBER_DISABLE_QUANTIZED_KERNELS")
    )


@functools.cache
def many_row_kernel() -> str | None:
    """The kernel for bf16 steps of many rows here (weights dequantized a tile at a time, in cache): "amx" on CPUs
    with AMX-BF16 (where Linux lends its tiles), else "dpbf16" on AVX512-BF16 (AMD Zen 4 and 5); None where the
    bf16 kernels do not run. EMBER_DISABLE_AMX=1 picks "dpbf16" on an AMX CPU (what a Zen 4 runs, for A/B)."""
    if not kernels_available(torch.bfloat16):
        return None
    library = native.load()
    if hasattr(library, "amx_linear_q4_bf16") and not os.environ.get("EMBER_DISABLE_AMX") and library.amx_enable():
        return "amx"
    return "dpbf16" if hasattr(library, "dpbf16_linear_q4_bf16") else None


@dataclass
class KernelCall:
    """One segment's kernel and its bound pointers: it writes `out_features` columns of each output row,
    `out_offset` bytes into the row."""

    function: ctypes._CFuncPtr
    weight_args: tuple[int | None, ...]  # quants, scales, mins, bias
    out_features: int
    out_offset: int


class QuantizedMatmul:
    """`x @ weight.T (+ bias)` from the blocks (pointers bound once): steps of at most `max_rows` rows on the
    kernels for a few rows, larger ones, if asked for `many_rows`, on the kernel for many rows where one runs here
    (`max_rows` is then its `FEW_ROWS`), else on the former too."""

    def __init__(self, weight: QuantizedMatrix, bias: torch.Tensor | None, dtype: torch.dtype, many_rows: bool) -> None:
        assert native.load() is not None
        self.weight, self.bias, self.dtype = weight, bias, dtype  # kept alive: the kernels hold their pointers
        self.out_features, self.in_features = weight.shape
        many = many_row_kernel() if dtype == torch.bfloat16 and many_rows else None
        self.many_rows = many is not None
        self.max_rows = FEW_ROWS[many] if many else MAX_ROWS[dtype]
        self.calls = self._bind(f"quantized_linear_{{kernel}}_{SUFFIX[dtype]}")
        self.many_row_calls = self._bind(f"{many}_linear_{{kernel}}_bf16") if many else self.calls

    def _bind(self, name: str) -> list[KernelCall]:
        library = native.load()
        calls, column = [], 0
        element_size = torch.empty(0, dtype=self.dtype).element_size()
        for segment in self.weight.segments:
            mins = None if segment.mins is None else segment.mins.data_ptr()
            bias_ptr = None if self.bias is None else self.bias[column:].data_ptr()
            function = getattr(library, name.format(kernel=segment.kernel))
            args = (segment.quants.data_ptr(), segment.scales.data_ptr(), mins, bias_ptr)
            calls.append(KernelCall(function, args, segment.shape[0], column * element_size))
            column += segment.shape[0]
        return calls

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty((rows, self.out_features), dtype=self.dtype)
        x_ptr, out_ptr = x.data_ptr(), out.data_ptr()
        for call in self.calls if rows <= self.max_rows else self.many_row_calls:
            call.function(
                *call.weight_args,
                x_ptr,
                out_ptr + call.out_offset,
                rows,
                call.out_features,
                self.in_features,
                self.out_features,
            )
        return out


class QuantizedLinear(nn.Module):
    """An `nn.Linear` whose weight is only its GGUF blocks: where `many_row_kernel()`, every step multiplies from
    them. Made on the meta device in place of the model's linear, so its weight is never materialized; the
    kernels are bound at the first call, once the bias (if any) has been loaded."""

    def __init__(self, weight: QuantizedMatrix, linear: nn.Linear) -> None:
        super().__init__()
        self.blocks = weight
        self.out_features, self.in_features = weight.shape
        self.dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(torch.empty_like(linear.bias), requires_grad=False)
        self._matmul: QuantizedMatmul | None = None

    @property
    def matmul(self) -> QuantizedMatmul:
        if self._matmul is None:
            bias = None if self.bias is None else self.bias.detach()
            self._matmul = QuantizedMatmul(self.blocks, bias, self.dtype, many_rows=True)
        return self._matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks.kernels}"


class QuantizedEmbedding(nn.Module):
    """An embedding table held as its GGUF blocks, the rows a step looks up dequantized (in C, bit for bit the
    loader's weights): beside linears that keep only their blocks, no dense table either (Qwen3-0.6B's: 297 MiB of
    bf16, a tied LM head's blocks already holding it)."""

    def __init__(self, blocks: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks, self.dtype = blocks, dtype
        self.num_embeddings, self.embedding_dim = blocks.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids.reshape(-1)
        mins = None if self.blocks.mins is None else self.blocks.mins[rows]
        picked = QuantizedWeight(self.blocks.kernel, self.blocks.quants[rows], self.blocks.scales[rows], mins)
        return dequantize(picked).to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, blocks={self.blocks.kernel}"


def quantize_linears(model: nn.Module, blocks: dict[str, QuantizedMatrix]) -> set[str]:
    """Replace each linear of `model` (on the meta device, before its weights are loaded) that has blocks the
    kernels multiply at every step size here by a `QuantizedLinear`, and then its embedding table by a
    `QuantizedEmbedding`; returns their names. None where the model keeps the dequantized weights beside the blocks
    (`keep_dequantized_copy`): its larger steps (prefill, batches past the few-row kernels) then run on oneDNN's
    bf16 matmul."""
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16 and usable(blocks.get(name), module)
    }
    copy_bytes = sum(module.weight.numel() * module.weight.element_size() for module in linears.values())
    if not linears or keep_dequantized_copy(many_row_kernel(), copy_bytes, available_memory_bytes()):
        return set()
    for name, module in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear(blocks[name], module))
    table, embedding = blocks.get("embed_tokens"), getattr(model, "embed_tokens", None)
    tied_to_a_dense_head = model.config.tie_word_embeddings and "lm_head" not in linears
    if table is None or embedding is None or len(table.segments) != 1 or tied_to_a_dense_head:
        return set(linears)
    if table.shape != tuple(embedding.weight.shape) or not kernels_available(embedding.weight.dtype):
        return set(linears)
    model.embed_tokens = QuantizedEmbedding(table.segments[0], embedding.weight.dtype)
    return {*linears, "embed_tokens"}


# A GGUF model on AVX512-BF16 without AMX keeps its dequantized weights while they take at most this share of the
# memory available: they make steps of 16-32 rows 5-14% faster there (`benchmarks/NOTES.md` step 32).
KEEP_COPY_MEMORY_SHARE = 0.25


def keep_dequantized_copy(kernel: str | None, copy_bytes: int, available_bytes: int) -> bool:
    """Whether a GGUF model keeps bf16 copies of its linears beside the blocks. Always where no kernel for many
    rows runs here; never with AMX's (within 3-8% of oneDNN, NOTES step 29); with AVX512-BF16's (dequantizing
    costs it more) while the copy is small next to the memory available, so a model that fits only as its
    blocks still runs. EMBER_KEEP_DEQUANTIZED_WEIGHTS=1 or 0 decides instead (A/B comparisons)."""
    asked = os.environ.get("EMBER_KEEP_DEQUANTIZED_WEIGHTS")
    if kernel is None or asked in ("0", "1"):
        return kernel is None or asked == "1"
    return kernel == "dpbf16" and copy_bytes <= KEEP_COPY_MEMORY_SHARE * available_bytes


def usable(weight: QuantizedMatrix | None, linear: torch.nn.Linear) -> bool:
    """Whether `weight` can stand in for `linear`'s weight in a kernel that runs here."""
    dtype = linear.weight.dtype
    return (
        weight is not None
        and kernels_available(dtype)
        and weight.shape == tuple(linear.weight.shape)
        and (linear.bias is None or linear.bias.dtype == dtype)
    )
