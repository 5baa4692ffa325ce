"""Subnormal floats flushed to zero, process-wide (docs/speed.md, "Process-wide")."""

from __future__ import annotations

import os

import torch

FLUSH_ENV = "MMSA_EMT_FLUSH_DENORMAL"


def flush_denormals() -> bool:
    """Flushes subnormal floats (below ~1e-38 in fp32) to zero for this process, unless ``MMSA_EMT_FLUSH_DENORMAL=0``;
    returns whether the CPU supports it (x86 with SSE3).

    Inputs with most of their steps zeroed (high missing rates) make subnormal values in training, and the CPU
    handles those many times slower than normal ones. Nothing else changes. It must be set before PyTorch starts
    its CPU worker threads, hence at ``import mmsa_emt``; being process-wide, it is an environment variable rather
    than a key of ``SpeedConfig``.
    """
    if os.environ.get(FLUSH_ENV, "1") == "0":
        return False
    return torch.set_flush_denormal(True)
