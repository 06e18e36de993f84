"""Continuous batching: each step decides how many tokens of which requests to compute.

Prefill, chunked prefill and decode are all "N tokens of request R", so one step mixes them under a
token budget. Running requests go first (oldest first); waiting ones are admitted while budget, KV
blocks and the sequence limit allow, each first taking its longest cached prefix and scheduling only the
rest. When blocks run out, the newest running request is preempted: its blocks are freed and it returns
to the front of the waiting queue to be recomputed later (from its cached prefix, if still cached). With
`max_loras`, a waiting request of a LoRA adapter that would make one adapter too many among the running is
passed over, keeping its place, for the requests behind it.

The "priority" policy (vLLM's `--scheduling-policy priority`) orders both queues by (priority, arrival),
lower values first: waiting requests are admitted in that order, running ones are served in it and preempted
from its end (the least important, then the newest). A waiting request that outranks the least important
running one and cannot be admitted (no sequence slot, or too few blocks) preempts it, so that important work
does not wait for long generations of less important work to end.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # tokens of the request already in the KV cache before this step
    num_tokens: int  # tokens computed this step: positions [start, start + num_tokens)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify, the step's last tokens

    @property
    def completes_sequence(self) -> bool:
        """True when this step reaches the request's last token, so a new token gets sampled."""
        return self.start + self.num_tokens == self.request.num_tokens + len(self.spec_token_ids)

    @property
    def is_decode(self) -> bool:
        """One committed token (plus any drafts): every query token attends like a decode."""
        return self.start + 1 == self.request.num_tokens and self.completes_sequence


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_loras: int | None = None) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.max_loras = max_loras  # distinct LoRA adapters running at once (None: any)
        self.by_priority = config.policy == "priority"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._arrivals = itertools.count()

    def add(self, request: Request) -> None:
        request.arrival = next(self._arrivals)
        if self.by_priority:
            self._insert(self.waiting, request)
        else:
            self.waiting.append(request)

    @staticmethod
    def _insert(queue: deque[Request] | list[Request], request: Request) -> None:
        """Put `request` into `queue` (kept in rank order) after every request that ranks before or with it."""
        queue.insert(bisect.bisect_right(queue, request.rank, key=lambda r: r.rank), request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.by_priority:
            self._preempt_for_waiting(out)
        evicted = False  # running work preempted for running work's blocks: admitting more now would thrash
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            pending = request.num_tokens - request.num_computed_tokens
            if request.spec_token_ids:  # drafts ride along only whole-step with their decode token
                del request.spec_token_ids[max(0, budget - pending) if pending == 1 else 0 :]
            num_new = min(pending + len(request.spec_token_ids), budget)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()  # the newest (or least important); never one scheduled this step
                self._preempt(victim)
                out.preempted.append(victim)
                evicted = True
                if victim is request:
                    break
            else:
                self._take(out, request, num_new)
                budget -= num_new
                index += 1
        if not evicted:
            limit = self.max_loras
            adapters = {r.lora_id for r in self.running if r.lora_id} if limit is not None else set()
            index = 0  # waiting requests before it were passed over (their adapter cannot run now)
            while index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[index]
                if limit is not None and request.lora_id and request.lora_id not in adapters:
                    if len(adapters) >= limit:
                        index += 1
                        continue
                    adapters.add(request.lora_id)
                computed = self.kv_cache.get_computed_blocks(request)
                num_cached = len(computed) * self.kv_cache.block_size
                num_new = min(request.num_tokens - num_cached, budget)
                if not self.kv_cache.allocate_slots(request, num_new, computed):
                    break
                del self.waiting[index]
                self.kv_cache.record_lookup(request.num_tokens, num_cached)
                if request.num_cached_tokens is None:  # its first admission (not after a preemption)
                    request.num_cached_tokens = num_cached
                    request.first_scheduled = time.monotonic()
                request.num_computed_tokens = num_cached
                request.status = RequestStatus.RUNNING
                if self.by_priority:
                    self._insert(self.running, request)
                else:
                    self.running.append(request)
                self._take(out, request, num_new)
                budget -= num_new
        return out

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        """Priority policy: while the first waiting request outranks the last running one and cannot be
        admitted this step for want of a sequence slot or of blocks, preempt the latter. The running requests
        are counted as taking their whole next step (as they do unless blocks run short)."""
        while self.waiting and self.running and self.waiting[0].rank < self.running[-1].rank:
            candidate = self.waiting[0]
            if len(self.running) < self.config.max_num_seqs:
                steps = [(r, r.num_tokens - r.num_computed_tokens + len(r.spec_token_ids)) for r in self.running]
                budget = self.config.max_num_batched_tokens - sum(n for _, n in steps)
                if budget <= 0:
                    return  # no admission this step, whatever is preempted
                growth = sum(self.kv_cache.num_blocks_taken(r, n) for r, n in steps)
                computed = self.kv_cache.get_computed_blocks(candidate)
                uncached = candidate.num_tokens - len(computed) * self.kv_cache.block_size
                needed = self.kv_cache.num_blocks_taken(candidate, min(uncached, budget), computed)
                if growth + needed <= self.kv_cache.pool.num_free_blocks:
                    return
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    def schedule_decodes(self, requests: list[Request]) -> list[ScheduledRequest] | None:
        """One more token for each of `requests` (running, decoding), scheduled while the step before is still
        on the device (async scheduling); None, changing nothing, when the free blocks or the token budget
        do not cover all of them (the caller then waits for that step and schedules normally)."""
        if len(requests) > self.config.max_num_batched_tokens or not self.kv_cache.allocate_decode_slots(requests):
            return None
        out = SchedulerOutput()
        for request in requests:
            self._take(out, request, 1)
        return out.scheduled

    @staticmethod
    def _take(out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_new, request.spec_token_ids))
        request.spec_token_ids = []
        request.num_computed_tokens += num_new

    def rollback(self, request: Request, num_rejected: int) -> None:
        """Forget the KV of `num_rejected` drafted tokens: they are recomputed over (or never used), and
        blocks past the request's computed tokens go back to the pool."""
        request.num_computed_tokens -= num_rejected
        self.kv_cache.trim(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.spec_token_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._insert(self.waiting, request)
        else:
            self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request (stop, length or abort) wherever it is, and free its blocks at once."""
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
