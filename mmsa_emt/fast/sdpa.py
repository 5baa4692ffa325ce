"""Which of PyTorch's scaled-dot-product attention kernels the model lets it pick: the fusion's and BERT's."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend


@torch.compiler.assume_constant_result  # under torch.compile: read once while tracing, not a graph break
def fused_backends(device: torch.device) -> list[SDPBackend]:
    """The attention kernels PyTorch may pick here: those enabled, less cuDNN's on CUDA (the same function).

    In H100 and H200 profiles each cuDNN attention call took several times the host time of the memory-efficient
    kernel, and cuDNN builds a plan for every new sequence length, which trimmed batches keep producing (the
    numbers: docs/speed.md, ``fused_attention``).

    A compiled model keeps the choice it traced with: backend flags changed afterwards reach it on recompilation.
    """
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
               SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled() and device.type != "cuda"}
    return [backend for backend, on in enabled.items() if on]


def query_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of attention queries projected by ``weight`` here: autocast's within autocast on its device (which
    leaves float64 alone), else the weight's. A float mask must have exactly this dtype for CUDA's fused kernels."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A key mask (..., j), nonzero/True at valid keys, as the additive bias PyTorch's attention makes of a boolean
    mask at every call: 0 at valid keys, -inf at the others, in the queries' ``dtype``. Made once and passed to
    several calls it saves that conversion (2-4 kernels) at each. Its rows are 8-aligned in memory, as CUDA's
    memory-efficient kernel wants (it copies a misaligned mask at every call): pass it 4-D, e.g. (b, 1, 1, j)."""
    *lead, length = mask.shape
    aligned = -(-length // 8) * 8
    bias = torch.zeros(*lead, aligned, dtype=dtype, device=mask.device)[..., :length]
    return bias.masked_fill_(mask == 0, float("-inf"))
