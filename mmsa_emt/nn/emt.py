"""Efficient Multimodal Transformer (EMT) of EMT-DLFR (Sun et al., IEEE TAC 2023, arXiv 2208.07589, Sec. 3.3).

The global multimodal context G (one token per modality) and each local unimodal sequence H_m promote each other
through Mutual Promotion Units (MPU); the M promoted contexts are then merged by attention pooling. Module layout,
parameter shapes and the three sharing levels follow the authors' released code (models/subNets/EMT.py).

Shape legend: b batch, t local sequence length, m modalities (= context tokens), d model width.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import Attention

POOL_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class FeedForward(nn.Module):
    """GEGLU feed-forward: Linear(d, 2*mult*d) -> x * gelu(gate) -> Linear(mult*d, d) -> Dropout."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (b, t, mult*d)
        return self.dropout(self.proj_out(x * F.gelu(gate)))


class HalfMPU(nn.Module):
    """One direction of a Mutual Promotion Unit (Eqs. 6-8): the target attends to a source, then to itself.

    X <- X + CrossAttn(LN(X), LN_c(C));  X <- X + SelfAttn(LN(X));  X <- X + FFN(LN(X))   (all pre-LN)
    """

    def __init__(self, dim: int, *, heads: int, attn_dropout: float = 0.0, ff_dropout: float = 0.0,
                 ff_expansion: int = 4) -> None:
        super().__init__()
        self.norm_cross, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads=heads, dropout=attn_dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads=heads, dropout=attn_dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_expansion, dropout=ff_dropout)

    def forward(self, x: Tensor, context: Tensor, *, x_mask: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """x (b, t_x, d), context (b, t_c, d) -> x (b, t_x, d); masks (b, t) True at valid steps."""
        x = x + self.cross_attn(self.norm_cross(x), self.norm_context(context), key_mask=context_mask)
        x = x + self.self_attn(self.norm_self(x), key_mask=x_mask)
        return x + self.ff(self.norm_ff(x))


class AttentionPooling(nn.Module):
    """Merges the M promoted contexts (Eq. 9): score = Linear(Md, 1)(act(Linear(Md, Md)(G_m))), softmax over m."""

    def __init__(self, num_modalities: int, dim: int, *, activation: str = "tanh") -> None:
        super().__init__()
        if activation not in POOL_ACTIVATIONS:
            raise ValueError(f"attn_act_fn={activation!r} is not one of {sorted(POOL_ACTIVATIONS)}")
        width = num_modalities * dim
        self.score = nn.Sequential(nn.Linear(width, width), POOL_ACTIVATIONS[activation](), nn.Linear(width, 1))

    def forward(self, contexts: Tensor) -> Tensor:
        flat = rearrange(contexts, "b k m d -> b k (m d)")  # one flattened context per modality k
        weights = self.score(flat).softmax(dim=1)  # (b, k, 1)
        pooled = (weights * flat).sum(dim=1)  # (b, m*d)
        return rearrange(pooled, "b (m d) -> b m d", m=contexts.shape[2])


class PositionalEmbedding(nn.Module):
    """Sinusoidal (fixed) or learnable absolute position embedding added to the local sequences (Eq. 5)."""

    def __init__(self, dim: int, *, max_len: int = 1024, learnable: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.dropout = nn.Dropout(dropout)
        self.table = nn.Parameter(torch.randn(1, max_len, dim)) if learnable else None

    def sinusoid(self, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fixed table's first ``length`` rows (1, t, d): sin at even, cos at odd features."""
        position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (t, 1)
        freq = torch.exp(torch.arange(0, self.dim, 2, device=device).float() * (-math.log(10000.0) / self.dim))
        table = torch.zeros(length, self.dim, device=device)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq[: self.dim // 2])  # odd d: one cosine fewer, as the authors
        return table[None].to(dtype)  # (1, t, d)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if self.table is None:
            return self.dropout(x + self.sinusoid(length, x.device, x.dtype))
        if length > self.max_len:
            raise ValueError(f"sequence of {length} steps is longer than the learnable position table "
                             f"({self.max_len}); raise max_seq_len")
        return self.dropout(x + self.table[:, :length])


def _replicate(module: nn.Module, n: int, *, share: bool) -> nn.ModuleList:
    """n references to one module (shared parameters) or n deep copies (same initial values, as the authors)."""
    return nn.ModuleList([module] * n if share else [copy.deepcopy(module) for _ in range(n)])


class EMT(nn.Module):
    """Stack of EMT layers with hierarchical parameter sharing (Sec. 3.3.3).

    Each layer: for every modality m, in parallel from the same G,
    H_m <- HalfMPU(H_m, context G) and G_m <- HalfMPU(G, context H_m); then G <- AttentionPooling(G_1..G_M).
    ``mpu_share``: both directions share one HalfMPU; ``modality_share``: all modalities share;
    ``layer_share``: all layers share (the pooling too).
    """

    def __init__(
        self, dim: int, *, depth: int, heads: int, num_modalities: int = 3, ff_expansion: int = 4,
        attn_dropout: float = 0.0, ff_dropout: float = 0.0, emb_dropout: float = 0.0,
        learnable_pos_emb: bool = False, max_seq_len: int = 1024, mpu_share: bool = True,
        modality_share: bool = True, layer_share: bool = True, pool_activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.pos_emb = PositionalEmbedding(dim, max_len=max_seq_len, learnable=learnable_pos_emb, dropout=emb_dropout)
        mpu = HalfMPU(dim, heads=heads, attn_dropout=attn_dropout, ff_dropout=ff_dropout, ff_expansion=ff_expansion)
        directions = _replicate(mpu, 2, share=mpu_share)  # [local <- global, global <- local]
        per_modality = _replicate(directions, num_modalities, share=modality_share)
        self.layers = _replicate(per_modality, depth, share=layer_share)
        pool = AttentionPooling(num_modalities, dim, activation=pool_activation)
        self.pools = _replicate(pool, depth, share=layer_share)

    def forward(self, context: Tensor, local: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """context G (b, m, d); local[k] H_k (b, t_k, d) with masks[k] (b, t_k) True at valid steps.

        Returns the final context (b, m, d) and the promoted local sequences.
        """
        if not (len(local) == len(masks) == len(self.layers[0])):
            raise ValueError(f"EMT built for {len(self.layers[0])} modalities got {len(local)} sequences")
        local = [self.pos_emb(x) for x in local]  # Eq. 5
        for layer, pool in zip(self.layers, self.pools):
            promoted = []
            for k, ((to_local, to_context), mask) in enumerate(zip(layer, masks)):
                promoted.append(to_context(context, local[k], context_mask=mask))  # G_k: (b, m, d)
                local[k] = to_local(local[k], context, x_mask=mask)  # H_k: (b, t_k, d)
            context = pool(torch.stack(promoted, dim=1))  # Eq. 9: (b, k, m, d) -> (b, m, d)
        return context, local
