"""Vectorized sampling over the whole batch: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Each stage runs only when some request in the batch needs it; an all-greedy batch is one argmax.
Random draws use the exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly from p
and lets a seeded request draw its noise from its own generator, independent of the rest of the batch.
Logprobs are those of the model's raw distribution, before any sampling transformation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.request import Request, TokenLogprob
from ember.kernels import device_tensor


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprob | None]:
    """For each row: the chosen token's logprob and rank, and the `num_top[i]` most likely tokens."""
    if not any(k is not None for k in num_top):
        return [None] * len(num_top)
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    k_max = max((k or 0) for k in num_top)
    top_values, top_ids = logprobs.topk(max(k_max, 1), dim=1)
    chosen_l, ranks_l, ids_l, values_l = chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist()
    result: list[TokenLogprob | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            result.append(None)
            continue
        top = list(zip(ids_l[i][:k], values_l[i][:k], strict=True))
        result.append(TokenLogprob(int(token_ids[i]), chosen_l[i], ranks_l[i], top))
    return result


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    logits = logits.clone()
    for i, r in enumerate(requests):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(r.params.logit_bias.values()), device=logits.device)
    return logits


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition (over prompt and output, as in HF), presence and frequency (over output) penalties."""
    num_rows, vocab = logits.shape
    device = logits.device
    out_counts = torch.zeros(num_rows, vocab, device=device)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(requests):
        out_ids = r.output_token_ids
        if out_ids:
            ids = torch.tensor(out_ids, device=device)
            out_counts[i].index_add_(0, ids, torch.ones(len(out_ids), device=device))
        if r.params.repetition_penalty != 1.0:
            seen[i, torch.tensor(r.all_token_ids, device=device)] = True
    rep = device_tensor([r.params.repetition_penalty for r in requests], device, torch.float32).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = device_tensor([r.params.frequency_penalty for r in requests], device, torch.float32).unsqueeze(1)
    pres = device_tensor([r.params.presence_penalty for r in requests], device, torch.float32).unsqueeze(1)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def filter_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, top-p nucleus and min-p floor."""
    device = logits.device
    top_ks = [r.params.top_k for r in requests]
    top_ps = [r.params.top_p for r in requests]
    min_ps = [r.params.min_p for r in requests]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=device).unsqueeze(0)
        k = device_tensor([k if k > 0 else logits.shape[1] for k in top_ks], device).unsqueeze(1)
        drop_sorted = ranks >= k
        if any(p < 1.0 for p in top_ps):
            probs = torch.softmax(sorted_logits.masked_fill(drop_sorted, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # never drops the most likely token
            drop_sorted |= mass_before >= device_tensor(top_ps, device, torch.float32).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter_(1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if any(p > 0.0 for p in min_ps):
        probs = torch.softmax(logits, dim=-1)
        floor = device_tensor(min_ps, device, torch.float32).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def exponential_noise(shape: tuple[int, int], requests: list[Request], device: torch.device) -> torch.Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for i, r in enumerate(requests):
        if r.generator is not None:
            noise[i] = torch.empty(shape[1]).exponential_(generator=r.generator).to(device)
    return noise


def adjust_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Logit bias and penalties: what greedy decoding takes the argmax of."""
    if any(r.params.logit_bias for r in requests):
        logits = apply_logit_bias(logits, requests)
    if any(r.params.uses_penalties for r in requests):
        logits = apply_penalties(logits, requests)
    return logits


def sampling_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The distribution a random sample is drawn from: temperature, then top-k/top-p/min-p, then softmax."""
    temperatures = device_tensor([r.params.temperature or 1.0 for r in requests], logits.device, torch.float32)
    return torch.softmax(filter_logits(logits / temperatures.unsqueeze(1), requests), dim=-1)


def samples_without_sync(request: Request) -> bool:
    """Whether `sample_tokens` for this request stays on the device: no logprobs to read back, no per-request
    generator (its noise is drawn on the host), no penalties or logit bias (built from host lists)."""
    params = request.params
    return params.logprobs is None and request.generator is None and not params.uses_penalties and not params.logit_bias


def sample_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """One token per row of `logits` ([num_rows, vocab], float32), on the logits' device."""
    logits = adjust_logits(logits, requests)
    greedy = [r.params.greedy for r in requests]
    if all(greedy):
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, requests)
    noise = exponential_noise(tuple(probs.shape), requests, logits.device)
    token_ids = (probs / noise).argmax(dim=-1)
    if any(greedy):
        token_ids = torch.where(device_tensor(greedy, logits.device, torch.bool), logits.argmax(dim=-1), token_ids)
    return token_ids


def sample(logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
    """Pick one token per row of `logits` ([num_rows, vocab], float32), one row per request."""
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in requests):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    token_ids = sample_tokens(logits, requests)
    logprobs: list[TokenLogprob | None] = [None] * len(requests)
    if raw_logprobs is not None:
        logprobs = top_logprobs(raw_logprobs, token_ids, [r.params.logprobs for r in requests])
    return SamplerOutput(token_ids.tolist(), logprobs)
