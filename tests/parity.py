"""The parity rule between Ember and HF transformers (vLLM's `check_logprobs_close`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from ember.engine.request import RequestOutput


def hf_greedy(
    model: Any, prompts: list[list[int]], max_new_tokens: int, top: int = 5
) -> list[tuple[list[int], list[set[int]]]]:
    """HF greedy tokens (EOS not special) and the top-`top` token ids at each generated position, per prompt.

    A plain loop over HF's forward with its KV cache: `generate` would stop at EOS or, with
    `min_new_tokens`, suppress it, and either changes the greedy sequence. The prompts run as one
    left-padded batch: a CPU decode step reads all the weights whatever the batch, so eight prompts cost
    little more than one (on SmolLM2 the tokens equal those of one prompt at a time, 128 of 128).
    """
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # the cache argument is `cache` in newer transformers, `past_key_values` before (as on the GPU machines)
    accepted = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in accepted else "past_key_values"
    kv_cache = {name: DynamicCache()}  # filled in place by each forward
    last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    device = next(model.parameters()).device
    tokens: list[list[int]] = [[] for _ in prompts]
    tops: list[list[set[int]]] = [[] for _ in prompts]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                **kv_cache,
                **last_logits_only,
            )
            logits = out.logits[:, -1].float().cpu()
            ids = logits.argmax(-1, keepdim=True)
            top_ids = logits.topk(top).indices.tolist()
            for row, token in enumerate(ids[:, 0].tolist()):
                tokens[row].append(token)
                tops[row].append(set(top_ids[row]))
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    return list(zip(tokens, tops, strict=True))


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
