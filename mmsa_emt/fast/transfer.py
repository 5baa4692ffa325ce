"""Host-to-device copies that do not block the host.

A plain ``tensor.to('cuda')`` of pageable host memory waits for the GPU to drain its queue first (it is a host
synchronisation: ``torch.cuda.set_sync_debug_mode`` reports it). Through pinned memory the copy is queued like a
kernel and the host runs on; PyTorch's pinned-memory cache keeps the buffer until the copy has run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``; from the CPU to CUDA through pinned memory, without a host synchronisation."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
