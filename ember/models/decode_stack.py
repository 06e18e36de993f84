"""A whole step of few query rows in one C call (`kernels/csrc/decode_stack.c`), on the CPU: decodes, drafts
being verified, and small prefill chunks where they attend as rows (the bf16 kernel).

At one row a SmolLM2 step spent about half its time in Python: ~270 calls from Python per step (norms, linears,
rotary, attention) at 5-13 us each around kernels of a few microseconds. The C driver runs the same kernels
in the same order on the same buffers, so its hidden states are bit-identical to `LlamaForCausalLM.forward`;
it needs every layer's linears on GGUF blocks (`quantized.py`), which bound it to `MAX_ROWS` rows (with a kernel
that takes their larger steps, AMX's or AVX512-BF16's, to `MANY_ROW_STEP_ROWS`). Gemma 2 and 3, Phi-4-mini
(partial rotary) and Granite (scalar multipliers) run in it too.
"""

from __future__ import annotations

import ctypes

import torch

from ember.attention.torch_paged import AttentionMetadata
from ember.kernels import native
from ember.kernels.elementwise import NORM_KERNELS, SUFFIX
from ember.models.llama import LlamaForCausalLM
from ember.models.packed_linear import PackedLinear
from ember.models.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedMatmul

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _QuantizedSegment(ctypes.Structure):
    _fields_ = [
        ("quants", _ptr),
        ("scales", _ptr),
        ("mins", _ptr),
        ("bias", _ptr),
        ("fn", _ptr),
        ("many_rows_fn", _ptr),
        ("out_features", _i64),
    ]


MAX_SEGMENTS = 3  # decode_stack.c's
# rows of a one-call step whose linears run a kernel for many rows past their few-row kernels' `max_rows`
MANY_ROW_STEP_ROWS = 64


class _QuantizedLinear(ctypes.Structure):
    _fields_ = [
        ("segments", _QuantizedSegment * MAX_SEGMENTS),
        ("num_segments", _i64),
        ("out_features", _i64),
        ("in_features", _i64),
        ("few_rows", _i64),
        ("lora_a", _ptr),  # LoRA adapters by slot (`LoRALinear.table`); NULL: none
        ("lora_b", _ptr),
        ("lora_cols", _ptr),
        ("lora_ranks", _ptr),
    ]


class _DecoderLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("pre_mlp_norm", _ptr),
        ("attention_out_norm", _ptr),
        ("mlp_out_norm", _ptr),
        ("qkv", _QuantizedLinear),
        ("o", _QuantizedLinear),
        ("gate_up", _QuantizedLinear),
        ("down", _QuantizedLinear),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("q_norm", _ptr),
        ("k_norm", _ptr),
        ("window", _i64),
        ("cos", _ptr),
        ("sin", _ptr),
    ]


SCRATCH = ("x", "h", "residual", "qkv", "q", "k", "v", "attn", "gate_up", "act")


class _EmbeddingBlocks(ctypes.Structure):
    _fields_ = [
        *((name, _ptr) for name in ("quants", "scales", "mins", "dequantize")),
        *((name, _i64) for name in ("row_bytes", "row_scales_bytes", "row_mins_bytes")),
        ("row", _ptr),
    ]


class _DecodeStack(ctypes.Structure):
    _fields_ = [
        *((name, _i64) for name in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        *((name, _i64) for name in ("num_blocks", "block_size", "elem_size", "rotary_dim")),
        *((name, _f32) for name in ("eps", "scale", "embedding_scale", "softcap", "residual_scale")),
        ("layers", ctypes.POINTER(_DecoderLayer)),
        *((name, _ptr) for name in ("embedding", "final_norm")),
        *((name, _ptr) for name in ("rms_norm", "rotary", "act_and_mul", "scale_elements")),
        *((name, _ptr) for name in ("paged_decode", "write_kv", "lora_add")),
        *((name, _ptr) for name in SCRATCH),
        ("cos_rows", _ptr),
        ("sin_rows", _ptr),
        ("embedding_blocks", _EmbeddingBlocks),
    ]


def _layer_norms(layer: torch.nn.Module) -> tuple[torch.nn.Module | None, ...]:
    """A layer's norms in the stack's order: input, before the MLP, then (Gemma) of the attention's and the
    MLP's outputs, or None."""
    return layer.input_layernorm, layer.pre_mlp_norm, layer.attention_output_norm, layer.mlp_output_norm


def _small_steps(module: torch.nn.Module) -> QuantizedMatmul | None:
    if isinstance(module, QuantizedLinear):
        return module.matmul
    return module.small_steps if isinstance(module, PackedLinear) else None


def _address(function: ctypes._CFuncPtr) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value


class NativeDecodeStack:
    """`stack(token_ids, positions, attention metadata)`: the final hidden states [rows, hidden] of a step whose
    every row attends as a decode row (at most `max_rows`: single-token decodes, drafts being verified, and, on
    the bf16 kernel, small prefill chunks), K/V stored in the paged cache as the model stores them."""

    @classmethod
    def build(
        cls,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        num_blocks: int,
        block_size: int,
    ) -> NativeDecodeStack | None:
        """The stack of `model` (its linears packed with GGUF blocks), or None where it cannot run it."""
        library = native.load()
        dtype = model.norm.weight.dtype
        if library is None or dtype not in SUFFIX:
            return None
        layer_norms = (n for layer in model.layers for n in _layer_norms(layer) if n is not None)
        head_norms = (n for layer in model.layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n)
        norms = [model.norm, *layer_norms, *head_norms]
        if any(n.weight.dtype != dtype for n in norms):
            return None
        linears = [
            [_small_steps(m) for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            for a, mlp in ((layer.self_attn, layer.mlp) for layer in model.layers)
        ]
        if any(q is None or len(q.calls) > MAX_SEGMENTS for layer in linears for q in layer):
            return None
        return cls(model, kv_caches, num_blocks, block_size, linears, library)  # type: ignore[arg-type]

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        num_blocks: int,
        block_size: int,
        linears: list[list[QuantizedMatmul]],
        library: ctypes.CDLL,
    ) -> None:
        cfg = model.config
        dtype = model.norm.weight.dtype
        suffix = SUFFIX[dtype]
        every = [q for layer in linears for q in layer]
        self.max_rows = MANY_ROW_STEP_ROWS if all(q.many_rows for q in every) else min(q.max_rows for q in every)
        self.hidden = cfg.hidden_size
        self.dtype = dtype
        self._fn = library.decode_stack
        widths = {
            "x": cfg.hidden_size,
            "h": cfg.hidden_size,
            "residual": cfg.hidden_size,
            "qkv": (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
            "q": cfg.num_attention_heads * cfg.head_dim,
            "k": cfg.num_key_value_heads * cfg.head_dim,
            "v": cfg.num_key_value_heads * cfg.head_dim,
            "attn": cfg.num_attention_heads * cfg.head_dim,
            "gate_up": 2 * cfg.intermediate_size,
            "act": cfg.intermediate_size,
        }
        self._scratch = {name: torch.empty(self.max_rows, widths[name], dtype=dtype) for name in SCRATCH}
        rotary_dim = cfg.rotary_dim or cfg.head_dim
        self._rope_rows = [torch.empty(self.max_rows, rotary_dim // 2) for _ in range(2)]

        def linear(q: QuantizedMatmul) -> _QuantizedLinear:
            segments = [
                _QuantizedSegment(*few.weight_args, _address(few.function), _address(many.function), few.out_features)
                for few, many in zip(q.calls, q.many_row_calls, strict=True)
            ]
            array = (_QuantizedSegment * MAX_SEGMENTS)(*segments)
            return _QuantizedLinear(array, len(segments), q.out_features, q.in_features, q.max_rows)

        def weight(norm: torch.nn.Module | None) -> int | None:
            return None if norm is None else norm.weight.data_ptr()

        layers = (_DecoderLayer * cfg.num_hidden_layers)()
        for i, (layer, (k_cache, v_cache), parts) in enumerate(zip(model.layers, kv_caches, linears, strict=True)):
            attention = layer.self_attn
            cache = (k_cache.data_ptr(), v_cache.data_ptr())
            rotary = model.rotary if not attention.window or model.local_rotary is None else model.local_rotary
            layers[i] = _DecoderLayer(
                *map(weight, _layer_norms(layer)),
                *map(linear, parts),
                *cache,
                weight(attention.q_norm),
                weight(attention.k_norm),
                attention.window,
                rotary.cos.data_ptr(),
                rotary.sin.data_ptr(),
            )
        self._layers = layers
        self._model = model  # keeps the weights, norms and rotary tables the stack points at alive
        norm = NORM_KERNELS[model.norm.unit_offset]
        activation = {"silu": "silu_and_mul", "gelu_tanh": "gelu_tanh_and_mul"}[cfg.hidden_act]
        self._stack = _DecodeStack(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            num_blocks,
            block_size,
            torch.empty(0, dtype=dtype).element_size(),
            rotary_dim,
            cfg.rms_norm_eps,
            model.layers[0].self_attn.scale,  # the attention scale as the model computes it
            model.embedding_scale(),
            cfg.attn_logit_softcapping or 0.0,
            cfg.residual_multiplier,
            layers,
            None if isinstance(model.embed_tokens, QuantizedEmbedding) else model.embed_tokens.weight.data_ptr(),
            model.norm.weight.data_ptr(),
            _address(getattr(library, f"{norm}_{suffix}")),
            _address(getattr(library, f"rotary_{suffix}")),
            _address(getattr(library, f"{activation}_{suffix}")),
            _address(getattr(library, f"scale_{suffix}")),
            _address(getattr(library, f"paged_decode_{suffix}")),
            _address(library.write_kv),
            _address(getattr(library, f"lora_add_{suffix}")),
            *(self._scratch[name].data_ptr() for name in SCRATCH),
            *(t.data_ptr() for t in self._rope_rows),
            self._embedding_blocks(model.embed_tokens, library),
        )

    def _embedding_blocks(self, embedding: torch.nn.Module, library: ctypes.CDLL) -> _EmbeddingBlocks:
        """The stack's view of a GGUF embedding held as blocks; all NULL for a dense table."""
        if not isinstance(embedding, QuantizedEmbedding):
            return _EmbeddingBlocks()
        blocks = embedding.blocks
        self._embedding_row = torch.empty(embedding.embedding_dim)
        tensors = (blocks.quants, blocks.scales, blocks.mins)
        row_bytes = [0 if t is None else t[0].numel() * t.element_size() for t in tensors]
        pointers = [None if t is None else t.data_ptr() for t in tensors]
        dequantize = _address(getattr(library, f"dequantize_{blocks.kernel}_f32"))
        return _EmbeddingBlocks(*pointers, dequantize, *row_bytes, self._embedding_row.data_ptr())

    def attach_lora(self, tables: list[list[tuple[ctypes.Array, ...]]]) -> None:
        """Point each layer's linears (qkv, o, gate_up, down) at their LoRA tables, after adapters are loaded or
        unloaded (the tables are rebuilt then)."""
        for layer, layer_tables in zip(self._layers, tables, strict=True):
            for part, table in zip((layer.qkv, layer.o, layer.gate_up, layer.down), layer_tables, strict=True):
                part.lora_a, part.lora_b, part.lora_cols, part.lora_ranks = (
                    ctypes.cast(t, ctypes.c_void_p) for t in table
                )
        self._lora_tables = tables  # kept alive while the stack points at them

    def __call__(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`lora_slots`: each row's LoRA adapter slot (-1: none), when the step has adapter rows."""
        rows = token_ids.shape[0]
        tables, lens, row_tables = meta.decode_block_tables, meta.decode_context_lens, meta.decode_row_tables
        assert rows == meta.num_decode_tokens <= self.max_rows and not meta.prefills
        assert tables is not None and lens is not None and tables.is_contiguous() and tables.dtype == torch.int64
        out = torch.empty(rows, self.hidden, dtype=self.dtype)
        self._fn(
            ctypes.byref(self._stack),
            token_ids.data_ptr(),
            positions.data_ptr(),
            tables.data_ptr(),
            None if row_tables is None else row_tables.data_ptr(),
            lens.data_ptr(),
            meta.slot_mapping.data_ptr(),
            None if lora_slots is None else lora_slots.data_ptr(),
            rows,
            tables.shape[1],
            out.data_ptr(),
        )
        return out
