"""A GGUF file of random weights in the shape of a dummy preset (`--load-format dummy`'s, e.g. qwen3-0.6b), in a
block type the quantized kernels read: benchmarks of the GGUF path (the C decode stack, the quantized linears)
on architectures whose real GGUF is not on this machine. No tokenizer: prompts are token ids.

`.venv/bin/python benchmarks/cpu/random_gguf.py /tmp/qwen3-0.6b-q8.gguf [--preset qwen3-0.6b] [--type Q8_0]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ember.models.loader import DUMMY_PRESETS

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


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
    if config["architectures"][0] == "Qwen3ForCausalLM":
        shapes |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="qwen3-0.6b", choices=sorted(DUMMY_PRESETS))
    parser.add_argument("--type", default="Q8_0", choices=["Q8_0", "Q4_0", "Q4_1"], help="the matrices' block type")
    args = parser.parse_args()
    config = DUMMY_PRESETS[args.preset]
    arch = ARCHITECTURES[config["architectures"][0]]
    qtype = GGMLQuantizationType[args.type]
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
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    def add(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1:  # norms near one
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
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
