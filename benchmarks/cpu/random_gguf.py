"""A GGUF file of random weights in the shape of a dummy preset (`--load-format dummy`'s, e.g. qwen3-0.6b), in a
block type the quantized kernels read: benchmarks of the GGUF path (the C decode stack, the quantized linears)
on architectures whose real GGUF is not on this machine. No tokenizer: prompts are token ids.

`--type Q4_K_M` (`Q5_K_M`) mixes types as llama.cpp's Q4_K_M (Q5_K_M) does: Q4_K (Q5_K), with the LM head (or the
tied embedding) in Q6_K, and v and the MLP's down projection in Q6_K in the first and last eighth of the layers
and every third between. Matrices whose rows are not whole 256-weight super-blocks take llama.cpp's fallback
types (Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0, Q2_K, Q3_K and IQ4_XS: IQ4_NL), as SmolLM2's width of 576 makes them do.
K-quant and IQ4 blocks are random bytes under small scales (gguf-py cannot quantize to those types).

`.venv/bin/python benchmarks/cpu/random_gguf.py /tmp/qwen3-0.6b-q8.gguf [--preset qwen3-0.6b] [--type Q8_0]
[--rotary-dim N] [--granite]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ember.models.loader import DUMMY_PRESETS

ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}


def layer_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Each layer's GGUF tensors and their (rows, columns) shapes."""
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {
        "attn_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q, hidden),
        "attn_k.weight": (kv, hidden),
        "attn_v.weight": (kv, hidden),
        "attn_output.weight": (hidden, q),
        "ffn_gate.weight": (inter, hidden),
        "ffn_up.weight": (inter, hidden),
        "ffn_down.weight": (hidden, inter),
    }
    if config["architectures"][0] in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        shapes |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    if config["architectures"][0] == "Gemma3ForCausalLM":  # each sublayer's output normalized too
        shapes |= {"post_attention_norm.weight": (hidden,), "post_ffw_norm.weight": (hidden,)}
    return shapes


K_QUANT_SCALES = {  # byte offsets of each block's fp16 scales, and a scale that gives weights of ~0.02
    GGMLQuantizationType.Q4_K: ((0, 2), 1e-4),  # d, dmin
    GGMLQuantizationType.Q5_K: ((0, 2), 5e-5),
    GGMLQuantizationType.Q6_K: ((208,), 2e-5),  # d
    GGMLQuantizationType.Q3_K: ((108,), 6e-4),
    GGMLQuantizationType.IQ4_XS: ((0,), 2e-5),
    GGMLQuantizationType.IQ4_NL: ((0,), 3e-4),
    GGMLQuantizationType.Q2_K: ((80, 82), 2e-3),  # d, dmin
}


def random_k_quant(shape: tuple[int, int], qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Rows of random blocks of a type gguf-py cannot quantize to (K-quants, IQ4) with small, finite scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_size, type_size), dtype=np.uint8)
    offsets, scale = K_QUANT_SCALES[qtype]
    for offset in offsets:
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return raw.reshape(shape[0], -1)


# llama.cpp's types for matrices whose rows are not whole K-quant super-blocks
K_QUANT_FALLBACK = {
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_K: GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q3_K: GGMLQuantizationType.IQ4_NL,
    GGMLQuantizationType.IQ4_XS: GGMLQuantizationType.IQ4_NL,
    GGMLQuantizationType.Q2_K: GGMLQuantizationType.IQ4_NL,
}


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers whose v and down projections Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def k_m_type(base: GGMLQuantizationType, name: str, layers: int, tied: bool) -> GGMLQuantizationType:
    """A tensor's type in llama.cpp's Q4_K_M or Q5_K_M mix (`base`: Q4_K or Q5_K)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return GGMLQuantizationType.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and more_bits(int(name.split(".")[1]), layers):
        return GGMLQuantizationType.Q6_K
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="qwen3-0.6b", choices=sorted(DUMMY_PRESETS))
    parser.add_argument(
        "--type",
        default="Q8_0",
        choices=[
            "Q8_0",
            "Q4_0",
            "Q4_1",
            "Q5_0",
            "Q5_1",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q3_K",
            "Q2_K",
            "IQ4_NL",
            "IQ4_XS",
            "Q4_K_M",
            "Q5_K_M",
        ],
        help="the matrices' block type, or one of llama.cpp's mixes",
    )
    parser.add_argument(
        "--rotary-dim", type=int, help="the leading dims of each head that rotate (partial rotary, as Phi-4-mini's 3/4)"
    )
    parser.add_argument(
        "--granite", action="store_true", help="a Llama-shaped preset as IBM Granite 3: its four scalar multipliers"
    )
    args = parser.parse_args()
    config = DUMMY_PRESETS[args.preset]
    arch = ARCHITECTURES[config["architectures"][0]]
    if args.granite:
        if arch != "llama":
            parser.error("--granite takes a Llama-shaped preset (Granite's layout is Llama's)")
        arch = "granite"
    layers, tied = config["num_hidden_layers"], config["tie_word_embeddings"]
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(args.out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    if args.rotary_dim:
        writer.add_rope_dimension_count(args.rotary_dim)
    if args.granite:  # Granite 3.1 8B's values, but the attention's (head_dim ** -0.5, as Granite 3's smaller ones)
        writer.add_float32("granite.embedding_scale", 12.0)
        writer.add_float32("granite.residual_scale", 0.22)
        writer.add_float32("granite.attention.scale", config["head_dim"] ** -0.5)
        writer.add_float32("granite.logit_scale", 8.0)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if window := config.get("sliding_window"):
        writer.add_sliding_window(window)

    def add(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1:  # norms near one
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        if args.type.endswith("_M"):
            qtype = k_m_type(GGMLQuantizationType[args.type.removesuffix("_M")], name, layers, tied)
        else:
            qtype = GGMLQuantizationType[args.type]
        if qtype in K_QUANT_FALLBACK and shape[1] % 256:
            qtype = K_QUANT_FALLBACK[qtype]
        if qtype in K_QUANT_SCALES:
            writer.add_tensor(name, random_k_quant(shape, qtype, rng), raw_dtype=qtype)
        else:
            weights = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, quantize(weights, qtype), raw_dtype=qtype)

    add("token_embd.weight", (config["vocab_size"], config["hidden_size"]))
    add("output_norm.weight", (config["hidden_size"],))
    if not config["tie_word_embeddings"]:
        add("output.weight", (config["vocab_size"], config["hidden_size"]))
    for layer in range(config["num_hidden_layers"]):
        for name, shape in layer_tensors(config).items():
            add(f"blk.{layer}.{name}", shape)
        print(f"\rlayer {layer + 1}/{config['num_hidden_layers']}", end="", flush=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
