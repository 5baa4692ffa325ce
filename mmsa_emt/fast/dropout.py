"""Dropout whose CPU mask comes from numpy's PCG64 generator instead of torch's CPU generator.

On the CPU torch's ``bernoulli_`` is slow enough that BERT-base's hidden dropouts are a visible share of a training
step; numpy's PCG64 draws the same mask in a fraction of the time (docs/speed.md, ``numpy_dropout``). The seed is
drawn from torch's generator, so ``torch.manual_seed`` still fixes a run and ``torch.utils.checkpoint`` (which
restores torch's generator before recomputing) replays the same mask. Same function as ``nn.Dropout``: each element
is kept with probability 1 - p and scaled by 1 / (1 - p); only the random stream differs. Only a boolean mask (1
byte per element) is kept for the backward pass. Elsewhere than on the CPU, in eval mode and inside
``torch.compile``, this is ``nn.Dropout``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .chunked_attention import draw_seed, keep_mask


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the CPU mask drawn by numpy (see the module docstring); same ``p``, same state dict.
    ``use_numpy_dropout`` swaps it in for the ``nn.Dropout`` modules of a model (``numpy_dropout``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu"
                and not self.inplace) or torch.compiler.is_compiling():  # numpy cannot be traced
            return super().forward(x)
        keep = keep_mask(draw_seed(), 0, tuple(x.shape), self.p)
        return _KeepAndScale.apply(x, keep, 1.0 / (1.0 - self.p))


def use_numpy_dropout(module: nn.Module, on: bool = True) -> int:
    """Makes every ``nn.Dropout`` inside ``module`` (a transformers BERT's too) this :class:`Dropout` (``on``), or
    every :class:`Dropout` an ``nn.Dropout`` again; the same modules, ``p`` and state dict. Returns how many changed."""
    swapped = 0
    for child in module.modules():
        if type(child) is (nn.Dropout if on else Dropout):
            child.__class__ = Dropout if on else nn.Dropout
            swapped += 1
    return swapped
