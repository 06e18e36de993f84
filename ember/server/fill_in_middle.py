"""Fill-in-the-middle: OpenAI's `suffix` on /v1/completions, for code models trained to write the middle of a file
(editor completions at the cursor: the code before it is the prompt, the code after it the suffix).

The prompt is laid out prefix-suffix-middle (PSM) with the model's own FIM tokens, Qwen2.5-Coder's
`<|fim_prefix|>` ... or StarCoder's `<fim_prefix>` ..., and the model writes what goes between. The two texts are
tokenized apart, so that no token spans the seams.
"""

from __future__ import annotations

from typing import Any

# (prefix, suffix, middle) token spellings, by model family
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Qwen3-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
)


def fim_token_ids(tokenizer: Any) -> tuple[int, int, int] | None:
    """The ids of the tokenizer's prefix, suffix and middle tokens; None when it has none."""
    vocab = tokenizer.get_vocab()
    for names in FIM_TOKENS:
        if all(name in vocab for name in names):
            prefix, suffix, middle = (vocab[name] for name in names)
            return prefix, suffix, middle
    return None


def fim_prompt(prefix_ids: list[int], suffix_ids: list[int], tokens: tuple[int, int, int]) -> list[int]:
    """The prompt that asks for the middle between `prefix_ids` and `suffix_ids`."""
    prefix, suffix, middle = tokens
    return [prefix, *prefix_ids, suffix, *suffix_ids, middle]
