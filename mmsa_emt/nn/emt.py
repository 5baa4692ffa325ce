"""Efficient Multimodal Transformer (EMT) of EMT-DLFR (Sun et al., IEEE TAC 2023, arXiv 2208.07589, Sec. 3.3).

The global multimodal context G (one token per modality) and each local unimodal sequence H_m promote each other
through Mutual Promotion Units (MPU); the M promoted contexts are then merged by attention pooling. Module layout,
parameter shapes and the three sharing levels follow the authors' released code (models/subNets/EMT.py); the
attention itself runs through PyTorch's fused scaled-dot-product kernels (with dropout on a CPU: the chunked,
recomputing ``chunked_attention``) unless ``fused=False``.

Shape legend: b batch, t local sequence length, m modalities (= context tokens), d model width, h heads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .chunked_attention import chunked_dropout_attention
from .dropout import Dropout
from .sdpa import additive_mask, fused_backends, query_dtype

STACKINGS = (None, "time", "batch")  # EMT's ways to run all modalities in one call (None: one call each)
Segments = tuple[Sequence[int], Sequence[int]]  # (query lengths, key lengths) of sequences joined along time
# (b, t_k) True at valid keys; or one per key segment, each None (all valid), such a mask, or (fused attention) its
# additive bias (b, 1, 1, t_k) made by ``sdpa.additive_mask``
KeyMask = Tensor | Sequence[Tensor | None] | None
POOL_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class Attention(nn.Module):
    """Multi-head (cross-)attention: bias-free q/kv projections, output projection with bias, dropout on weights.

    ``key_mask`` (b, t_k) is True at valid keys; padded keys get no weight.
    """

    def __init__(self, dim: int, *, heads: int, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width d_model={dim} is not divisible by heads={heads}")
        self.heads, self.dropout, self.fused = heads, dropout, fused
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: KeyMask = None,
                segments: Segments | None = None) -> Tensor:
        """x (b, t_q, d) attends to context (b, t_k, d) (default: itself).

        ``segments`` = (query lengths, key lengths): x and context are several sequences joined along time, and
        query segment s attends only to key segment s (one kernel per run of consecutive equal segments). With
        segments, ``key_mask`` may also be one mask per key segment, None where all of its keys are valid: that
        segment's attention then runs without a mask (no mask conversion, alignment copy or masked kernel).
        """
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b i (h e) -> b h i e", h=self.heads)  # (b, h, t_q, d/h)
        k, v = (rearrange(t, "b j (h e) -> b h j e", h=self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        if segments is None:
            if key_mask is not None and not isinstance(key_mask, Tensor):
                raise ValueError("one key mask per segment needs the segments")
            out = self._attend(q, k, v, None if key_mask is None else rearrange(key_mask, "b j -> b 1 1 j"))
        else:  # one kernel per run of consecutive segments of equal lengths, stacked along the batch
            runs = segment_runs(*segments, queries=q.shape[2], keys=k.shape[2],
                                merge=not torch.compiler.is_compiling())  # compiled: no guard on equal lengths
            q_runs = q.split([n * i for n, i, _ in runs], dim=2)
            k_runs, v_runs = (t.split([n * j for n, _, j in runs], dim=2) for t in (k, v))
            outs = []
            for (n, _, _), qr, kr, vr, mr in zip(runs, q_runs, k_runs, v_runs, run_masks(key_mask, runs)):
                stack = lambda t, n=n: rearrange(t, "b h (s i) e -> (s b) h i e", s=n)  # noqa: E731
                out = self._attend(stack(qr), stack(kr), stack(vr), mr)  # (n b, h, i, d/h)
                outs.append(rearrange(out, "(s b) h i e -> b (s i) h e", s=n))
            # joined heads-last: the fused kernels write (b, i, h, e), so the heads merge below without a copy
            out = rearrange(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], "b i h e -> b h i e")
        return self.to_out(rearrange(out, "b h i e -> b i (h e)"))  # (b, t_q, d)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(e) + mask) v with dropout on the weights: (b, h, i, e), (b, h, j, e) -> (b, h, i, e)."""
        dropout = self.dropout if self.training else 0.0
        if self.fused and dropout > 0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            # no CPU kernel takes dropout: chunked (its numpy masks cannot be traced; compiled, the math path)
            return chunked_dropout_attention(q, k, v, mask, dropout)
        if self.fused:
            with sdpa_kernel(fused_backends(q.device)):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        scores = torch.einsum("bhie,bhje->bhij", q, k) / math.sqrt(q.shape[-1])  # explicit, as the authors
        if mask is not None and mask.is_floating_point():  # an additive bias
            scores = scores + mask
        elif mask is not None:
            scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
        return F.dropout(scores.softmax(dim=-1), dropout, self.training) @ v


def run_masks(key_mask: KeyMask, runs: Sequence[tuple[int, int, int]]) -> list[Tensor | None]:
    """The key mask of each run of ``segment_runs``, (n b, 1, 1, j) with the segments stacked along the batch as the
    queries are, from the joined mask (b, sum of n j) or from one mask per key segment (None: all keys valid; a
    run whose segments are all such gets None; additive biases (b, 1, 1, j) give additive biases)."""
    if key_mask is None:
        return [None] * len(runs)
    if isinstance(key_mask, Tensor):
        pieces = key_mask.split([n * j for n, _, j in runs], dim=1)
        return [rearrange(piece, "b (s j) -> (s b) 1 1 j", s=n) for piece, (n, _, _) in zip(pieces, runs)]
    if len(key_mask) != sum(n for n, _, _ in runs):
        raise ValueError(f"{len(key_mask)} key masks for {sum(n for n, _, _ in runs)} key segments")
    masks, start = [], 0
    for n, _, _ in runs:
        group, start = key_mask[start:start + n], start + n
        given = [m for m in group if m is not None]
        if not given:
            masks.append(None)
            continue
        additive = given[0].dim() == 4  # (b, 1, 1, j): 0 at valid keys; else (b, j): True there
        valid = None if len(given) == n else \
            given[0].new_zeros(given[0].shape) if additive else given[0].new_ones(given[0].shape)
        stacked = given[0] if n == 1 else torch.cat([valid if m is None else m for m in group])  # (n b, [1, 1,] j)
        masks.append(stacked if additive else stacked[:, None, None, :])  # (n b, 1, 1, j)
    return masks


def segment_runs(query_steps: Sequence[int], key_steps: Sequence[int], *, queries: int, keys: int,
                 merge: bool = True) -> list[tuple[int, int, int]]:
    """Pairs of (query, key) segment lengths grouped into runs of equal consecutive pairs: [(count, i, j)].

    ``queries`` and ``keys`` are the joined lengths the segments must add up to. ``merge=False``: one run per
    pair (a traced graph then holds for any lengths, not only for those equal when it was traced).
    """
    if len(query_steps) != len(key_steps) or sum(query_steps) != queries or sum(key_steps) != keys:
        raise ValueError(f"attention segments {list(query_steps)} x {list(key_steps)} do not pair up {queries} "
                         f"queries with {keys} keys")
    runs: list[tuple[int, int, int]] = []
    for pair in zip(query_steps, key_steps):
        if merge and runs and runs[-1][1:] == pair:
            runs[-1] = (runs[-1][0] + 1, *pair)
        else:
            runs.append((1, *pair))
    return runs


class FeedForward(nn.Module):
    """GEGLU feed-forward: Linear(d, 2*mult*d) -> x * gelu(gate) -> Linear(mult*d, d) -> Dropout."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Linear(dim * mult, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (b, t, mult*d)
        return self.dropout(self.proj_out(x * F.gelu(gate)))


class HalfMPU(nn.Module):
    """One direction of a Mutual Promotion Unit (Eqs. 6-8): the target attends to a source, then to itself.

    X <- X + CrossAttn(LN(X), LN_c(C));  X <- X + SelfAttn(LN(X));  X <- X + FFN(LN(X))   (all pre-LN)

    ``checkpoint_ff``: in training, LN + FFN (the widest activations, 2 x mult x d per step) are recomputed in the
    backward pass instead of kept; the dropout mask is replayed, so values and gradients are unchanged.
    """

    def __init__(
        self, dim: int, *, heads: int, attn_dropout: float = 0.0, ff_dropout: float = 0.0, ff_expansion: int = 4,
        fused: bool = True, checkpoint_ff: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_ff = checkpoint_ff
        self.norm_cross, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads=heads, dropout=attn_dropout, fused=fused)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads=heads, dropout=attn_dropout, fused=fused)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_expansion, dropout=ff_dropout)

    def forward(self, x: Tensor, context: Tensor, *, x_mask: KeyMask = None,
                context_mask: KeyMask = None, cross_segments: Segments | None = None,
                x_segments: Sequence[int] | None = None) -> Tensor:
        """x (b, t_x, d), context (b, t_c, d) -> x (b, t_x, d). With several sequences joined along time,
        ``cross_segments`` pairs x's segments with the context's and ``x_segments`` splits x for self-attention."""
        x = x + self.cross_attn(self.norm_cross(x), self.norm_context(context), key_mask=context_mask,
                                segments=cross_segments)
        self_segments = None if x_segments is None else (x_segments, x_segments)
        x = x + self.self_attn(self.norm_self(x), key_mask=x_mask, segments=self_segments)
        if self.checkpoint_ff and self.training and torch.is_grad_enabled():
            return x + checkpoint(self._feed_forward, x, use_reentrant=False)
        return x + self._feed_forward(x)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.ff(self.norm_ff(x))


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
        self.dropout = Dropout(dropout)
        self.table = nn.Parameter(torch.randn(1, max_len, dim)) if learnable else None
        self._sinusoids: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # cache, not state

    def sinusoid(self, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fixed table's first ``length`` rows (1, t, d). Each row depends on its position alone, so the table
        is built once per device and dtype, for max_len rows or the longest sequence seen, and sliced after
        (9 kernels per modality and view saved). Inside ``torch.compile`` it is part of the graph instead (a
        cache filled while tracing would force a recompilation)."""
        if torch.compiler.is_compiling():
            return self._sinusoid_table(length, device).to(dtype)
        table = self._sinusoids.get((device, dtype))
        if table is None or table.shape[1] < length:
            with torch.inference_mode(False), torch.no_grad():
                table = self._sinusoid_table(max(length, self.max_len), device).to(dtype)
            self._sinusoids[(device, dtype)] = table
        return table[:, :length]

    def _sinusoid_table(self, length: int, device: torch.device) -> Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (t, 1)
        freq = torch.exp(torch.arange(0, self.dim, 2, device=device).float() * (-math.log(10000.0) / self.dim))
        table = torch.zeros(length, self.dim, device=device)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq[: self.dim // 2])  # odd d: one cosine fewer, as the authors
        return table[None]  # (1, t, d)

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

    ``stack_modalities`` (only with ``modality_share``; one shared HalfMPU then serves every modality) runs each
    layer with one HalfMPU call per direction instead of M, the same function with M-fold fewer kernel launches:
    - "time": the M local sequences are joined along time, so every per-step layer (LayerNorm, projections,
      feed-forward) runs once over all of them; only the attention kernels run per modality, on slices. No padding:
      the FLOPs of the loop. With ``mpu_share`` both directions run as one call per layer (the joined inputs are
      copies: 7 % more of a training step's activations at the MOSI shape).
    - "batch": they are padded to the longest and stacked along the batch (work and memory on the padding).
    """

    def __init__(
        self, dim: int, *, depth: int, heads: int, num_modalities: int = 3, ff_expansion: int = 4,
        attn_dropout: float = 0.0, ff_dropout: float = 0.0, emb_dropout: float = 0.0,
        learnable_pos_emb: bool = False, max_seq_len: int = 1024, mpu_share: bool = True,
        modality_share: bool = True, layer_share: bool = True, pool_activation: str = "tanh", fused: bool = True,
        stack_modalities: str | None = None, checkpoint_ff: bool = False,
    ) -> None:
        super().__init__()
        if stack_modalities not in STACKINGS:
            raise ValueError(f"stack_modalities={stack_modalities!r}: choose one of {STACKINGS}")
        self.stack_modalities = stack_modalities if modality_share else None
        self.fused = fused
        self.pos_emb = PositionalEmbedding(dim, max_len=max_seq_len, learnable=learnable_pos_emb, dropout=emb_dropout)
        mpu = HalfMPU(dim, heads=heads, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                      ff_expansion=ff_expansion, fused=fused, checkpoint_ff=checkpoint_ff)
        directions = _replicate(mpu, 2, share=mpu_share)  # [local <- global, global <- local]
        per_modality = _replicate(directions, num_modalities, share=modality_share)
        self.layers = _replicate(per_modality, depth, share=layer_share)
        pool = AttentionPooling(num_modalities, dim, activation=pool_activation)
        self.pools = _replicate(pool, depth, share=layer_share)

    def forward(self, context: Tensor, local: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """context (b, m, d); local[k] (b, t_k, d) with masks[k] (b, t_k) True at valid steps.

        Returns the final context (b, m, d) and the promoted local sequences.
        """
        if not (len(local) == len(masks) == len(self.layers[0])):
            raise ValueError(f"EMT built for {len(self.layers[0])} modalities got {len(local)} sequences")
        local = [self.pos_emb(x) for x in local]
        if self.stack_modalities == "time":
            return self._forward_joined(context, local, masks)
        if self.stack_modalities == "batch":
            return self._forward_stacked(context, local, masks)
        for layer, pool in zip(self.layers, self.pools):
            promoted = []
            for k, ((to_local, to_context), mask) in enumerate(zip(layer, masks)):
                promoted.append(to_context(context, local[k], context_mask=mask))  # G_k: (b, m, d)
                local[k] = to_local(local[k], context, x_mask=mask)  # H_k: (b, t_k, d)
            context = pool(torch.stack(promoted, dim=1))  # (b, k, m, d) -> (b, m, d)
        return context, local

    def _forward_stacked(self, context: Tensor, local: list[Tensor], masks: Sequence[Tensor]
                         ) -> tuple[Tensor, list[Tensor]]:
        """``forward`` with the modalities stacked along the batch (one shared HalfMPU serves them all)."""
        k, steps = len(local), [x.shape[1] for x in local]
        longest = max(steps)
        h = torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[1])) for x in local])  # (k b, t, d)
        mask = torch.cat([F.pad(m, (0, longest - m.shape[1]), value=False) for m in masks])  # (k b, t)
        for layer, pool in zip(self.layers, self.pools):
            to_local, to_context = layer[0]
            g = repeat(context, "b m d -> (k b) m d", k=k)
            promoted = to_context(g, h, context_mask=mask)  # G_k for every k: (k b, m, d)
            h = to_local(h, g, x_mask=mask)  # H_k for every k: (k b, t, d)
            context = pool(rearrange(promoted, "(k b) m d -> b k m d", k=k))  # (b, m, d)
        return context, [x[:, :t] for x, t in zip(h.chunk(k), steps)]

    def _forward_joined(self, context: Tensor, local: list[Tensor], masks: Sequence[Tensor]
                        ) -> tuple[Tensor, list[Tensor]]:
        """``forward`` with the local sequences joined along time (one shared HalfMPU serves them all).

        With ``mpu_share`` both directions are one module, so each layer runs it once: the M copies of G and the
        joined H go in side by side, G_k attending to H_k and every H_k to G, each sequence to itself.
        """
        k, m, steps = len(local), context.shape[1], [x.shape[1] for x in local]
        h = torch.cat(local, dim=1)  # (b, T, d); T = sum of t_k
        if self.fused:  # each mask made additive once, not by PyTorch in each of the 2 x depth calls using it
            dtype = query_dtype(self.layers[0][0][0].cross_attn.to_q.weight)
            masks = [additive_mask(mask[:, None, None, :], dtype) for mask in masks]  # (b, 1, 1, t_k)
        # one key mask per segment; G's keys are all valid, so attention to them runs unmasked (None)
        x_mask, context_mask = [None] * k + list(masks), [*masks, None]  # keys [G_1..G_k, H_1..H_k], [H_1..H_k, G]
        cross = ([m] * k + [sum(steps)], [*steps, m])  # G_k attends to H_k; all of H attends to G
        for layer, pool in zip(self.layers, self.pools):
            to_local, to_context = layer[0]
            g = repeat(context, "b m d -> b (k m) d", k=k)  # one copy of G per modality
            if to_local is to_context:  # [G_1..G_k, H] <- [H_1..H_k, G] in one call: (b, k m + T, d)
                x = to_local(torch.cat([g, h], dim=1), torch.cat([h, context], dim=1), x_mask=x_mask,
                             context_mask=context_mask, cross_segments=cross, x_segments=[m] * k + steps)
                promoted, h = x.split([k * m, x.shape[1] - k * m], dim=1)  # its backward: one cat, not 2 slices
            else:
                promoted = to_context(g, h, context_mask=list(masks), cross_segments=([m] * k, steps),
                                      x_segments=[m] * k)  # G_k for every k: (b, k m, d)
                h = to_local(h, context, x_mask=list(masks), x_segments=steps)  # every H_k attends to G: (b, T, d)
            context = pool(rearrange(promoted, "b (k m) d -> b k m d", k=k))  # (b, m, d)
        return context, list(h.split(steps, dim=1))
