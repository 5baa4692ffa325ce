"""Attention with dropout on the CPU, computed in chunks and recomputed in the backward pass.

PyTorch's CPU attention kernels do not take dropout, so with the paper's attention dropout (mosi: 0.3) every call
falls back to the math path: it keeps the (b, h, i, j) probabilities, the dropout mask and the dropped probabilities
for the backward pass, and draws one random number per score with torch's CPU generator; at MOSI's 500 vision frames
that is gigabytes per call. Here the rows (b * h) are processed a few at a time, so each chunk's score matrices stay
in cache; only q, k, v, the key mask and the dropout masks packed to one bit per score are kept, and the backward
pass recomputes each chunk's probabilities and unpacks its mask (measurements: docs/speed.md, ``fused_attention``).
The masks come from numpy's PCG64, seeded from torch's generator, so ``torch.manual_seed`` still fixes a run;
drawing them is most of this function's own cost, far more than unpacking them, which is why they are kept rather
than drawn again. Same function as ``F.scaled_dot_product_attention(q, k, v, mask, dropout_p)``: each probability is
kept with probability 1 - p and scaled by 1 / (1 - p); only the random stream differs.

Shape legend: n = b * h rows, i queries, j keys, e head width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

CHUNK_ELEMENTS = 2**20  # scores per chunk (4 MB in float32: fastest of 2^17..2^23 on 2 cores at 500 frames)


def draw_seed() -> int:
    """A mask seed drawn from torch's generator, so that ``torch.manual_seed`` fixes the masks too."""
    return int(torch.randint(0, 2**62, (1,)).item())


def keep_mask(seed: int, chunk: int, shape: tuple[int, ...], p: float) -> Tensor:
    """The dropout keep-mask of one chunk: True with probability 1 - p, a pure function of (seed, chunk)."""
    rng = np.random.default_rng([seed, chunk])
    return torch.from_numpy(rng.random(shape, dtype=np.float32) >= p)


def unpacked(bits: np.ndarray, shape: torch.Size) -> Tensor:
    """A boolean mask of ``shape`` from its ``np.packbits`` form."""
    return torch.from_numpy(np.unpackbits(bits, count=math.prod(shape)).view(np.bool_).reshape(shape))


def _chunks(n: int, i: int, j: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, i * j))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _probabilities(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) for one chunk: (c, i, e), (c, j, e), (c, 1, j) -> (c, i, j)."""
    return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale).softmax(dim=-1)


class _ChunkedDropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, p: float, seed: int) -> Tensor:
        scale, keep_scale = 1.0 / math.sqrt(q.shape[-1]), 1.0 / (1.0 - p)
        out = torch.empty_like(q)
        packed = []  # each chunk's keep mask, 1 bit per score
        with torch.autocast(q.device.type, enabled=False):  # computes in the inputs' dtype
            for index, rows in enumerate(_chunks(*q.shape[:2], k.shape[1])):
                probs = _probabilities(q[rows], k[rows], bias[rows], scale)  # (c, i, j)
                keep = keep_mask(seed, index, tuple(probs.shape), p)
                packed.append(np.packbits(keep.numpy()))  # (c * i * j / 8,) uint8
                torch.bmm(probs.mul_(keep).mul_(keep_scale), v[rows], out=out[rows])  # (c, i, e)
        ctx.save_for_backward(q, k, v, bias)
        ctx.p, ctx.packed = p, packed
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias = ctx.saved_tensors
        p, packed = ctx.p, ctx.packed
        scale, keep_scale = 1.0 / math.sqrt(q.shape[-1]), 1.0 / (1.0 - p)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_out = grad_out.to(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            for index, rows in enumerate(_chunks(*q.shape[:2], k.shape[1])):
                probs = _probabilities(q[rows], k[rows], bias[rows], scale)  # recomputed: (c, i, j)
                keep = unpacked(packed[index], probs.shape).to(probs.dtype).mul_(keep_scale)  # forward's mask
                g = grad_out[rows]  # (c, i, e)
                torch.bmm((probs * keep).transpose(1, 2), g, out=grad_v[rows])  # (c, j, e)
                grad_probs = torch.bmm(g, v[rows].transpose(1, 2)).mul_(keep)  # (c, i, j)
                grad_scores = probs.mul_(grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))  # softmax'
                torch.bmm(grad_scores, k[rows], out=grad_q[rows]).mul_(scale)  # (c, i, e)
                torch.bmm(grad_scores.transpose(1, 2), q[rows], out=grad_k[rows]).mul_(scale)  # (c, j, e)
        return grad_q, grad_k, grad_v, None, None, None


def chunked_dropout_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, p: float,
                              seed: int | None = None) -> Tensor:
    """Scaled dot-product attention with dropout on the attention weights, chunked and recomputed.

    q (b, h, i, e), k and v (b, h, j, e); key_mask (b, 1, 1, j) or None, True at valid keys (each query needs
    one), or an additive bias (0 there, -inf at the others); 0 <= p < 1. ``seed`` fixes the dropout mask (default:
    drawn from torch's generator). Returns (b, h, i, e).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    b, h, i, e = q.shape
    j = k.shape[2]
    if seed is None:
        seed = draw_seed()
    if key_mask is not None and key_mask.is_floating_point():  # already additive (sdpa.additive_mask)
        bias = key_mask.to(q.dtype)
    else:
        bias = torch.zeros(b, 1, 1, j, dtype=q.dtype, device=q.device)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask, torch.finfo(q.dtype).min)
    bias = bias.expand(b, h, 1, j).reshape(b * h, 1, j)  # (n, 1, j)
    flat = [x.reshape(b * h, -1, e) for x in (q, k, v)]  # (n, i|j, e)
    out = _ChunkedDropoutAttention.apply(*flat, bias, float(p), seed)
    return out.reshape(b, h, i, e)
