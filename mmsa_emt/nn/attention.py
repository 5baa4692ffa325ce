"""Multi-head (cross-)attention of the EMT's Mutual Promotion Units (Sec. 3.3, arXiv 2208.07589), computed as the
authors' code computes it: explicit score matrices, softmax, dropout on the weights.

Shape legend: b batch, h heads, i queries, j keys, e head width, d model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(e)) v with dropout ``dropout`` on the weights: q (b, h, i, e), k and v (b, h, j, e) ->
    (b, h, i, e). ``mask`` (b, 1, 1, j) is True at valid keys; the others get no weight."""
    scores = torch.einsum("bhie,bhje->bhij", q, k) / math.sqrt(q.shape[-1])  # (b, h, i, j)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
    return F.dropout(scores.softmax(dim=-1), dropout, training=dropout > 0) @ v


class Attention(nn.Module):
    """Multi-head attention: bias-free q/kv projections, output projection with bias, dropout on the weights."""

    def __init__(self, dim: int, *, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width d_model={dim} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (b, i, d) attends to context (b, j, d) (default: itself); key_mask (b, j) True at valid keys."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b i (h e) -> b h i e", h=self.heads)
        k, v = (rearrange(t, "b j (h e) -> b h j e", h=self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        mask = None if key_mask is None else rearrange(key_mask, "b j -> b 1 1 j")
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (b, h, i, e)
        return self.to_out(rearrange(out, "b h i e -> b i (h e)"))  # (b, i, d)
