"""Ember's kernels: C for the CPU (`native`, `elementwise`), Triton for CUDA (`triton_*`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA; EMBER_KERNELS=triton also selects them on the CPU, where they need
    TRITON_INTERPRET=1 (Triton's interpreter: slow, for testing the CUDA code path without a GPU)."""
    return device.type == "cuda" or os.environ.get("EMBER_KERNELS") == "triton"


def device_tensor(values: Sequence, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A tensor of host values on `device`. On CUDA it goes through pinned memory without blocking: a plain
    `torch.tensor(..., device="cuda")` waits for all queued GPU work, a sync in the middle of the step."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
