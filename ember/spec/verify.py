"""Verification of drafted tokens against the target model's distributions, one step for all drafts.

Row j of a speculating request's logits is the target's distribution for the token after draft j
(row 0: after the last committed token). Greedy requests keep the drafts that equal the target's argmax
and then take the target's own token, so their output is exactly that of plain greedy decoding.
Sampled requests use rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d_j is
accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected position is resampled from
norm(max(p_j - q_j, 0)); when every draft is accepted a bonus token is drawn from the last row. The
emitted tokens are then distributed exactly as the target's own samples. Ember's proposers draft
deterministically (q_j is one-hot on d_j), the special case `draft_probs=None`.
"""

from __future__ import annotations

import torch

from ember.engine.request import Request, TokenLogprob
from ember.engine.sampler import adjust_logits, draw, sampling_logits, top_logprobs
from ember.kernels import device_tensor


def accept_greedy(target_ids: list[int], drafts: list[int]) -> list[int]:
    """The drafts that match the target's argmax, then the target's token at the first mismatch (or the bonus)."""
    out = []
    for target, draft in zip(target_ids, drafts, strict=False):
        out.append(target)
        if target != draft:
            return out
    out.append(target_ids[len(drafts)])
    return out


def rejection_sample(
    probs: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Emit accepted drafts plus one token, distributed exactly as sampling from `probs` row by row.

    probs: [k + 1, vocab] target distributions; draft_probs: [k, vocab] the drafter's distributions (None:
    each draft was chosen deterministically).
    """
    uniforms = torch.rand(len(drafts), generator=generator).tolist()
    out = []
    for j, draft in enumerate(drafts):
        p = probs[j, draft].item()
        q = 1.0 if draft_probs is None else draft_probs[j, draft].item()
        if uniforms[j] * q < p:  # accept with probability min(1, p / q)
            out.append(draft)
            continue
        if draft_probs is None:
            residual = probs[j].clone()
            residual[draft] = 0.0
        else:
            residual = (probs[j] - draft_probs[j]).clamp_min_(0.0)
        if residual.sum() <= 0:  # only reachable through rounding: fall back to the target itself
            residual = probs[j]
        out.append(int(draw(residual.unsqueeze(0), [generator])))
        return out
    out.append(int(draw(probs[len(drafts)].unsqueeze(0), [generator])))
    return out


def verify_drafts(
    logits: torch.Tensor, request: Request, drafts: list[int]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Tokens to append for a speculating request (accepted drafts plus one) and their logprobs."""
    rows = [request] * len(logits)
    raw = torch.log_softmax(logits, dim=-1) if request.params.logprobs is not None else None
    adjusted = adjust_logits(logits, rows)
    if request.params.greedy:
        tokens = accept_greedy(adjusted.argmax(dim=-1).tolist(), drafts)
    else:
        tokens = rejection_sample(
            torch.softmax(sampling_logits(adjusted, rows), dim=-1), drafts, generator=request.generator
        )
    logprobs: list[TokenLogprob | None] = [None] * len(tokens)
    if raw is not None:
        chosen = device_tensor(tokens, raw.device)
        logprobs = top_logprobs(raw[: len(tokens)], chosen, [request.params.logprobs] * len(tokens))
    return tokens, logprobs
