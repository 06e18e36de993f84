"""The interface every drafter implements."""

from __future__ import annotations

from typing import Protocol

from ember.engine.request import Request


class Proposer(Protocol):
    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        """Draft up to `max_lengths[i]` tokens to follow each request's tokens (fewer, or none, is fine)."""
        ...

    def finish(self, request: Request) -> None:
        """The request ended: drop any per-request state."""
        ...
