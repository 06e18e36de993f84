"""Ember's kernels: C for the CPU (`native`, `elementwise`), Triton for CUDA (`triton_*`)."""

from __future__ import annotations

import os

import torch


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA; EMBER_KERNELS=triton also selects them on the CPU, where they need
    TRITON_INTERPRET=1 (Triton's interpreter: slow, for testing the CUDA code path without a GPU)."""
    return device.type == "cuda" or os.environ.get("EMBER_KERNELS") == "triton"
