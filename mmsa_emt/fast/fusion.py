"""The EMT computed with fewer kernels and less memory: the same function as ``nn.emt`` and ``nn.attention``, the
same parameters and state-dict keys. ``apply`` swaps these classes in.

- ``FastAttention``: PyTorch's fused attention kernels (``fused_attention``), one call per run of equal segments
  when sequences are joined along time.
- ``FastHalfMPU``: a half-MPU over joined sequences; in training its LayerNorm + feed-forward, the widest
  activations, recomputed in the backward pass (``checkpoint_fusion``; dropout masks replayed).
- ``JoinedEMT``: with ``modality_share`` (one HalfMPU serves every modality) the M local sequences joined along
  time, so every per-step layer runs once over all of them (``stack_modalities: "time"``).

Shape legend: b batch, t local sequence length, m modalities (= context tokens), d model width, h heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..nn.attention import Attention, attend
from ..nn.emt import EMT, HalfMPU
from .chunked_attention import chunked_dropout_attention
from .sdpa import additive_mask, fused_backends, query_dtype

Segments = tuple[Sequence[int], Sequence[int]]  # (query lengths, key lengths) of sequences joined along time
# (b, t_k) True at valid keys; or one per key segment, each None (all valid), such a mask, or (fused attention) its
# additive bias (b, 1, 1, t_k) made by ``sdpa.additive_mask``
KeyMask = Tensor | Sequence[Tensor | None] | None


class FastAttention(Attention):
    """``nn.attention.Attention`` with PyTorch's fused scaled-dot-product kernels (``fused``; with dropout on a CPU,
    where no kernel takes it: ``chunked_dropout_attention``), additive masks made once by the caller, and several
    sequences joined along time (``segments``, for ``JoinedEMT``). The same parameters and function.

    ``key_mask`` (b, t_k) is True at valid keys; padded keys get no weight.
    """

    fused: bool = True  # set by ``apply`` (fused_attention); False: the explicit score matrices

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
        if mask is not None and mask.is_floating_point():  # an additive bias, explicitly
            scores = torch.einsum("bhie,bhje->bhij", q, k) / math.sqrt(q.shape[-1]) + mask
            return F.dropout(scores.softmax(dim=-1), dropout, self.training) @ v
        return attend(q, k, v, mask, dropout)  # explicit, as the authors


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


class FastHalfMPU(HalfMPU):
    """``nn.emt.HalfMPU`` over several sequences joined along time, and with ``checkpoint_ff``, in training, LN + FFN
    (2 x mult x d per step) recomputed in the backward pass instead of kept; values and gradients are unchanged."""

    checkpoint_ff: bool = False  # set by ``apply`` (checkpoint_fusion)

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


class JoinedEMT(EMT):
    """``nn.emt.EMT`` with the local sequences joined along time (only with ``modality_share``: one shared HalfMPU
    serves them all, and ``apply`` makes its modules ``FastHalfMPU`` and ``FastAttention``). The same function with
    M-fold fewer kernel launches: every per-step layer (LayerNorm, projections, feed-forward) runs once over all
    sequences; only the attention kernels run per modality, on slices. No padding: the FLOPs of the loop. With
    ``mpu_share`` both directions run as one call per layer (the joined inputs are copies: 7 % more of a training
    step's activations at the MOSI shape)."""

    additive_masks: bool = True  # with fused attention, each key mask made an additive bias once per forward

    def forward(self, context: Tensor, local: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if not (len(local) == len(masks) == len(self.layers[0])):
            raise ValueError(f"EMT built for {len(self.layers[0])} modalities got {len(local)} sequences")
        return self._forward_joined(context, [self.pos_emb(x) for x in local], masks)

    def _forward_joined(self, context: Tensor, local: list[Tensor], masks: Sequence[Tensor]
                        ) -> tuple[Tensor, list[Tensor]]:
        """``forward`` with the local sequences joined along time (one shared HalfMPU serves them all).

        With ``mpu_share`` both directions are one module, so each layer runs it once: the M copies of G and the
        joined H go in side by side, G_k attending to H_k and every H_k to G, each sequence to itself.
        """
        k, m, steps = len(local), context.shape[1], [x.shape[1] for x in local]
        h = torch.cat(local, dim=1)  # (b, T, d); T = sum of t_k
        # each mask made additive once, not by PyTorch in each of the 2 x depth calls using it
        if self.additive_masks and self.layers[0][0][0].cross_attn.fused:
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
