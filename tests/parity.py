"""The parity rule between Ember and HF transformers (vLLM's `check_logprobs_close`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from ember.engine.request import RequestOutput


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, top: int = 5) -> tuple[list[int], list[set[int]]]:
    """HF greedy tokens (EOS not special) and the top-`top` token ids at each generated position.

    A plain loop over HF's forward with its KV cache: `generate` would stop at EOS or, with
    `min_new_tokens`, suppress it, and either changes the greedy sequence.
    """
    tokens: list[int] = []
    tops: list[set[int]] = []
    # the cache argument is `cache` in newer transformers, `past_key_values` before (as on the GPU machines)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv_cache = {name: DynamicCache()}  # filled in place by each forward
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids], device=device), use_cache=True, **kv_cache)
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            tops.append(set(logits.topk(top).indices.tolist()))
            out = model(torch.tensor([[token]], device=device), use_cache=True, **kv_cache)
    return tokens, tops


def assert_logprobs_close(ember: RequestOutput, hf_tokens: list[int], hf_tops: list[set[int]], label: str) -> None:
    """Equal tokens up to the first difference; there, each side's token is in the other's top-5."""
    completion = ember.outputs[0]
    assert completion.logprobs is not None
    for pos, (mine, theirs) in enumerate(zip(completion.token_ids, hf_tokens, strict=True)):
        if mine != theirs:
            ember_top = {t for t, _ in completion.logprobs[pos].top}
            assert mine in hf_tops[pos], f"{label}: Ember token {mine} at {pos} not in HF top-5 {hf_tops[pos]}"
            assert theirs in ember_top, f"{label}: HF token {theirs} at {pos} not in Ember top-5 {ember_top}"
            return
