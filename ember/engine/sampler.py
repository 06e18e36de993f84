"""Vectorized sampling over the whole batch: logit bias, token masks, penalties, temperature, top-k, top-p,
min-p, seeds, logprobs.

Each stage runs only when some request in the batch needs it; an all-greedy batch is one argmax.
Random draws invert each row's CDF at one uniform number, which samples exactly from p and lets a seeded
request draw its number from its own generator, independent of the rest of the batch.
Logprobs are those of the model's raw distribution, before any sampling transformation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.request import Request, TokenLogprob
from ember.engine.structured_output import mask_disallowed_tokens
from ember.kernels import device_tensor, use_triton


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
    """Add each request's bias to its tokens' logits. Every (row, token, bias) goes to the device in one
    transfer each: a `torch.tensor(..., device="cuda")` per request would wait for the GPU every time."""
    rows, token_ids, biases = [], [], []
    for i, r in enumerate(requests):
        for token, bias in (r.params.logit_bias or {}).items():
            rows.append(i)
            token_ids.append(token)
            biases.append(bias)
    device = logits.device
    index = (device_tensor(rows, device), device_tensor(token_ids, device))
    return logits.index_put(index, device_tensor(biases, device, torch.float32), accumulate=True)


def mask_stop_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """-inf, in place, on the stop tokens (EOS unless ignored, stop_token_ids) of the rows below `min_tokens`."""
    rows, token_ids = [], []
    for i, r in enumerate(requests):
        if r.below_min_tokens:
            rows.extend([i] * len(r.stop_ids))
            token_ids.extend(r.stop_ids)
    if rows:
        device = logits.device
        logits[device_tensor(rows, device), device_tensor(token_ids, device)] = float("-inf")
    return logits


def mask_to_allowed_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """-inf, in place, on every token outside `allowed_token_ids` in the rows of the requests that have them."""
    restricted, rows, token_ids = [], [], []
    for i, r in enumerate(requests):
        allowed = r.params.allowed_token_ids
        if allowed is not None:
            restricted.append(i)
            rows.extend([i] * len(allowed))
            token_ids.extend(allowed)
    device = logits.device
    blocked = torch.zeros_like(logits, dtype=torch.bool)
    blocked[device_tensor(restricted, device)] = True
    blocked[device_tensor(rows, device), device_tensor(token_ids, device)] = False
    return logits.masked_fill_(blocked, float("-inf"))


def mask_bad_words(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """-inf, in place, on each token that would complete a bad word: a one-token word's always, a longer word's
    when the output so far ends with the rest of it (vLLM's rule: the output's tokens, not its text)."""
    rows, token_ids = [], []
    for i, r in enumerate(requests):
        if not r.bad_words_token_ids:
            continue
        output = r.output_token_ids
        for word in r.bad_words_token_ids:
            before = len(word) - 1
            if before == 0 or (len(output) >= before and output[-before:] == word[:-1]):
                rows.append(i)
                token_ids.append(word[-1])
    if rows:
        device = logits.device
        logits[device_tensor(rows, device), device_tensor(token_ids, device)] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition (over prompt and output, as in HF), presence and frequency (over output) penalties. The
    batch's token lists go to the device flattened, one transfer each (none that waits for the GPU)."""
    num_rows, vocab = logits.shape
    device = logits.device
    out_rows: list[int] = []
    out_ids: list[int] = []
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    for i, r in enumerate(requests):
        tokens = r.output_token_ids
        out_rows.extend([i] * len(tokens))
        out_ids.extend(tokens)
        if r.params.repetition_penalty != 1.0:
            seen_rows.extend([i] * len(r.all_token_ids))
            seen_ids.extend(r.all_token_ids)
    out_counts = torch.zeros(num_rows, vocab, device=device)
    if out_ids:
        index = (device_tensor(out_rows, device), device_tensor(out_ids, device))
        out_counts.index_put_(index, torch.ones(len(out_ids), device=device), accumulate=True)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    if seen_ids:
        seen[device_tensor(seen_rows, device), device_tensor(seen_ids, device)] = True
    rep = device_tensor([r.params.repetition_penalty for r in requests], device, torch.float32).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = device_tensor([r.params.frequency_penalty for r in requests], device, torch.float32).unsqueeze(1)
    pres = device_tensor([r.params.presence_penalty for r in requests], device, torch.float32).unsqueeze(1)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


NUCLEUS_WINDOW = 1024  # top-p without top-k looks for its nucleus among this many most likely tokens first


def filter_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, top-p nucleus and min-p floor."""
    device = logits.device
    top_ks = [r.params.top_k for r in requests]
    top_ps = [r.params.top_p for r in requests]
    min_ps = [r.params.min_p for r in requests]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        thresholds = top_k_top_p_thresholds(logits, top_ks, top_ps)
        logits = logits.masked_fill(logits < thresholds.unsqueeze(1), float("-inf"))
    if any(p > 0.0 for p in min_ps):
        probs = torch.softmax(logits, dim=-1)
        floor = device_tensor(min_ps, device, torch.float32).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def top_k_top_p_thresholds(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """[rows] float32: each row's smallest kept logit (-inf: no filter) under its top-k (0: none) and the top-p
    nucleus of its renormalized top-k distribution (1.0: none): a token is kept when the mass ranked above it is
    below p, so the likeliest token always stays. Logits tied with the threshold are all kept, as HF's top-k
    keeps them.

    The thresholds come from a window of each row's likeliest tokens (`window_thresholds`: a `topk`, not a sort of
    the vocabulary: on the CPU a sort of 64 x 49K logits takes ~100 ms, a top-1024 ~12). The window is the largest
    top-k when every filtered row has one, else at least NUCLEUS_WINDOW tokens. A top-p-only row whose nucleus is
    wider than the window is searched again over its whole row: on CUDA by the radix search of `triton_sampling`
    (which runs for those rows only, decided on the device, with no sync), on the CPU by a sort.
    """
    vocab = logits.shape[1]
    filters = RowFilters.of(top_ks, top_ps, vocab, logits.device)
    width = max((k for k in filters.ks if k < vocab), default=1)
    if any(k == vocab and p < 1.0 for k, p in zip(filters.ks, top_ps, strict=True)):
        width = max(width, NUCLEUS_WINDOW)
    thresholds, covered = window_thresholds(logits, filters, min(width, vocab))
    if use_triton(logits.device):
        from ember.kernels.triton_sampling import radix_thresholds

        # the covered rows get no filter there (top-k of the vocabulary, top-p 1): their programs stop at once
        k_rows, p_rows = filters.k_rows.squeeze(1), filters.p_rows.squeeze(1)
        searched = radix_thresholds(logits, k_rows.masked_fill(covered, vocab), p_rows.masked_fill(covered, 1.0))
        return torch.where(covered, thresholds, searched)
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(1).tolist()
        thresholds[rows] = window_thresholds(logits[rows], filters.take(rows), vocab)[0]
    return thresholds


@dataclass(frozen=True)
class RowFilters:
    """Each row's top-k and top-p: lists for what the host decides, and [rows, 1] columns on the logits' device,
    sent there once a step (on CUDA each is a copy from pinned memory)."""

    ks: list[int]  # the vocabulary's size for no top-k
    top_ps: list[float]
    k_rows: torch.Tensor  # int64
    # float32; infinity for no top-p: float rounding can bring the mass before a tail token to 1.0, and such a row
    # must keep its tail
    p_rows: torch.Tensor

    @classmethod
    def of(cls, top_ks: list[int], top_ps: list[float], vocab: int, device: torch.device) -> RowFilters:
        ks = [k if 0 < k < vocab else vocab for k in top_ks]
        masses = [p if p < 1.0 else float("inf") for p in top_ps]
        return cls(
            ks,
            top_ps,
            device_tensor(ks, device).unsqueeze(1),
            device_tensor(masses, device, torch.float32).unsqueeze(1),
        )

    def take(self, rows: list[int]) -> RowFilters:
        index = torch.tensor(rows, device=self.k_rows.device)
        return RowFilters(
            [self.ks[i] for i in rows], [self.top_ps[i] for i in rows], self.k_rows[index], self.p_rows[index]
        )


def window_thresholds(logits: torch.Tensor, filters: RowFilters, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`top_k_top_p_thresholds` found among each row's `width` likeliest tokens (all of them sorted when `width`
    is the vocabulary), [rows] bool: whether the window holds the row's kept set: its top-k fits in it, or its
    nucleus's mass does, or it has no filter)."""
    device, vocab = logits.device, logits.shape[1]
    values = logits.topk(width, dim=-1).values if width < vocab else logits.sort(dim=-1, descending=True).values
    k_rows, p_rows = filters.k_rows, filters.p_rows
    keep = torch.arange(width, device=device).unsqueeze(0) < k_rows
    covered = k_rows <= width
    if any(p < 1.0 for p in filters.top_ps):
        # probabilities of the ranked tokens under each row's top-k distribution: normalized over the top-k when it
        # fits in the window, else over the whole row
        kept = values.masked_fill(~keep, float("-inf"))
        normalizer = kept.logsumexp(dim=-1, keepdim=True)
        if any(k > width for k in filters.ks):
            normalizer = torch.where(k_rows <= width, normalizer, logits.logsumexp(-1, keepdim=True))
        probs = torch.exp(kept - normalizer)
        cumulative = probs.cumsum(dim=-1)
        keep &= cumulative - probs < p_rows
        covered = (k_rows <= width) | (cumulative[:, -1:] >= p_rows)
    unfiltered = (k_rows >= vocab) & p_rows.isinf()
    covered |= unfiltered
    last_kept = keep.sum(dim=-1, keepdim=True).clamp_(min=1) - 1  # the kept ranks are a prefix
    thresholds = values.gather(1, last_kept).squeeze(1).masked_fill_(unfiltered.squeeze(1), float("-inf"))
    return thresholds, covered.squeeze(1)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row, exactly from `probs` (weights on any device, unnormalized is fine), by inverting
    each row's CDF (float64) at a uniform draw.

    One random number per row instead of one per token (an exponential race over 64 x 49K tokens took ~47 ms
    on the CPU). A row with a generator (a seeded request's, on the CPU) draws its number from it, whatever
    the rest of the batch and whatever the device; the others use the device's own random numbers.
    """
    device = probs.device
    uniform = torch.rand(len(generators), 1, dtype=torch.float64, device=device)
    seeded = [i for i, generator in enumerate(generators) if generator is not None]
    if seeded:
        draws = [torch.rand(1, generator=generators[i], dtype=torch.float64).item() for i in seeded]
        uniform[device_tensor(seeded, device)] = device_tensor(draws, device, torch.float64).unsqueeze(1)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    token_ids = torch.searchsorted(cdf, target, right=True).squeeze(1)  # token i owns [cdf[i - 1], cdf[i])
    # a row of NaN (no valid input makes one) would give the vocabulary's size: a token id the model would
    # read past its embedding table with, failing the whole step
    return token_ids.clamp_(max=probs.shape[1] - 1)


def adjust_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Logit bias, penalties, structured output's grammar, then the token masks (allowed tokens, bad words, stop
    tokens held back by `min_tokens`): what greedy decoding takes the argmax of. The masks work in place: take raw
    logprobs from `logits` before."""
    if not any(r.adjusts_logits for r in requests):
        return logits
    if any(r.params.logit_bias for r in requests):
        logits = apply_logit_bias(logits, requests)
    if any(r.params.uses_penalties for r in requests):
        logits = apply_penalties(logits, requests)
    if any(r.grammar is not None for r in requests):
        logits = mask_disallowed_tokens(logits, requests)
    guarded = [i for i, r in enumerate(requests) if r.grammar is not None and masks_tokens(r)]
    before_masks = logits[device_tensor(guarded, logits.device)] if guarded else None  # a copy
    if any(r.params.allowed_token_ids is not None for r in requests):
        logits = mask_to_allowed_tokens(logits, requests)
    if any(r.bad_words_token_ids for r in requests):
        logits = mask_bad_words(logits, requests)
    if any(r.params.min_tokens for r in requests):
        logits = mask_stop_tokens(logits, requests)
    if before_masks is not None:
        logits = restore_rows_left_empty(logits, guarded, before_masks)
    return logits


def masks_tokens(request: Request) -> bool:
    """Whether a token mask (allowed tokens, bad words, `min_tokens`) applies to the request's next token."""
    params = request.params
    return params.allowed_token_ids is not None or bool(request.bad_words_token_ids) or request.below_min_tokens


def restore_rows_left_empty(logits: torch.Tensor, rows: list[int], before_masks: torch.Tensor) -> torch.Tensor:
    """Give the rows (each under a grammar) that the token masks left with no token their logits from before the
    masks: where the grammar allows only what a mask takes away (its end below `min_tokens`, a bad word an enum
    demands), the grammar wins and the output stays valid. One read-back, only in steps with such rows."""
    index = device_tensor(rows, logits.device)
    empty = (logits[index] == float("-inf")).all(dim=-1)
    if bool(empty.any()):
        logits[index[empty]] = before_masks[empty]
    return logits


def sampling_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The logits a random sample is drawn from (by their softmax): temperature, then top-k/top-p/min-p."""
    temperatures = [1.0 if r.params.greedy else r.params.temperature for r in requests]  # greedy rows: unused
    temperatures = device_tensor(temperatures, logits.device, torch.float32)
    return filter_logits(logits / temperatures.unsqueeze(1), requests)


# CUDA: draw the rows without a seed by a Gumbel race (`triton_sampling.gumbel_race`: one read of the logits)
# instead of inverting their CDF: softmax, a float64 copy and its cumulative sum move ~1.4 GB at 256 x 151,936,
# and the whole temperature-1 sampler took 1.3 ms on an H200 (2026-12-04) against 0.13 ms greedy. The race reads
# 155 MB with 4 16-byte loads in flight per thread; even at the 0.3 TB/s the radix search's passes ran at, it is
# ~4x faster. Not yet timed on a GPU: kernel_times.py's sampler rows take both ways.
RACE_UNSEEDED_ROWS = True


def random_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """One token per row, drawn from its sampling distribution (`sampling_logits`). A seeded row always inverts
    its CDF at its generator's number, so it draws the same tokens on every device and path."""
    generators = [r.generator for r in requests]
    scaled = sampling_logits(logits, requests)
    if not (RACE_UNSEEDED_ROWS and use_triton(logits.device)):
        return draw(torch.softmax(scaled, dim=-1), generators)
    from ember.kernels.triton_sampling import gumbel_race

    token_ids = gumbel_race(scaled, int(torch.randint(2**31 - 1, ())))  # the host's generator: no device sync
    seeded = [i for i, generator in enumerate(generators) if generator is not None]
    if seeded:
        rows = device_tensor(seeded, logits.device)
        token_ids[rows] = draw(torch.softmax(scaled[rows], dim=-1), [generators[i] for i in seeded])
    return token_ids


def samples_without_sync(request: Request) -> bool:
    """Whether `sample_tokens` for this request stays on the device: no logprobs to read back, no penalties,
    logit bias, token masks (allowed tokens, bad words, `min_tokens`) or grammar (built on the host from the
    tokens so far, which a step launched behind another does not know yet). (A seed is fine: its one number per
    draw comes from a host generator.)"""
    params = request.params
    if params.logprobs is not None:
        return False
    if not request.adjusts_logits:
        return True
    return (
        not params.uses_penalties
        and not params.logit_bias
        and params.allowed_token_ids is None
        and not request.bad_words_token_ids
        and not (params.min_tokens and request.below_min_tokens)
        and request.grammar is None
    )


def sample_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """One token per row of `logits` ([num_rows, vocab], float32), on the logits' device."""
    logits = adjust_logits(logits, requests)
    greedy = [r.params.greedy for r in requests]
    if all(greedy):
        return logits.argmax(dim=-1)
    token_ids = random_tokens(logits, requests)
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
