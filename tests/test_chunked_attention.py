"""The CPU attention with dropout: chunked, recomputed in backward (masks kept packed), the same function as
PyTorch's attention."""

import pytest
import torch
import torch.nn.functional as F

from mmsa_emt.fast import chunked_attention
from mmsa_emt.fast.chunked_attention import chunked_dropout_attention, keep_mask


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64).requires_grad_() for n in (5, 6, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]  # (b, 1, 1, j)
    return q, k, v, mask


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked_attention, "CHUNK_ELEMENTS", 60)  # 2 of the 6 rows (5 x 6 scores) per chunk


def test_backward_matches_numerical_gradients(small_chunks):
    q, k, v, mask = inputs()
    assert torch.autograd.gradcheck(lambda q, k, v: chunked_dropout_attention(q, k, v, mask, 0.3, seed=7), (q, k, v))


def test_without_dropout_it_is_pytorch_attention(small_chunks):
    q, k, v, mask = inputs()
    out = chunked_dropout_attention(q, k, v, mask, 0.0, seed=1)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_is_explicit_attention_with_the_seeded_mask(small_chunks):
    """Forward = softmax(q k^T / sqrt(e) masked) * keep / (1 - p) @ v with the mask each chunk draws."""
    q, k, v, mask = inputs()
    p = 0.4
    out = chunked_dropout_attention(q, k, v, mask, p, seed=11)
    scores = (q @ k.transpose(-1, -2)) / 2.0  # sqrt(4)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).reshape(6, 5, 6)
    keep = torch.cat([keep_mask(11, 0, (2, 5, 6), p), keep_mask(11, 1, (2, 5, 6), p), keep_mask(11, 2, (2, 5, 6), p)])
    assert 0 < keep.float().mean() < 1
    ref = ((probs * keep / (1 - p)) @ v.reshape(6, 6, 4)).reshape(2, 3, 5, 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_backward_reuses_the_forward_masks(small_chunks, monkeypatch):
    """The masks are drawn once per chunk in the forward pass and kept packed (1 bit per score), not drawn again
    in the backward pass (drawing is most of the function's own cost); the gradients are the same as with the
    masks drawn again."""
    q, k, v, mask = inputs()
    out = chunked_dropout_attention(q, k, v, mask, 0.3, seed=7)
    draws = []
    monkeypatch.setattr(chunked_attention, "keep_mask", lambda *a: draws.append(a) or keep_mask(*a))
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    assert draws == []
    scores = (q @ k.transpose(-1, -2)) / 2.0
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).reshape(6, 5, 6)
    keep = torch.cat([keep_mask(7, c, (2, 5, 6), 0.3) for c in range(3)])  # the same masks, drawn again
    ref = ((probs * keep / 0.7) @ v.reshape(6, 6, 4)).reshape(2, 3, 5, 4)
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_packed_masks_unpack_to_themselves():
    import numpy as np

    from mmsa_emt.fast.chunked_attention import unpacked

    keep = keep_mask(1, 0, (3, 7, 5), 0.5)  # 105 scores: not a multiple of 8
    assert torch.equal(unpacked(np.packbits(keep.numpy()), keep.shape), keep)


def test_dropout_rate_and_seeding():
    assert keep_mask(3, 0, (200, 500), 0.3).float().mean().item() == pytest.approx(0.7, abs=0.005)
    q, k, v, mask = inputs()
    torch.manual_seed(5)
    a = chunked_dropout_attention(q, k, v, mask, 0.5)
    torch.manual_seed(5)
    b = chunked_dropout_attention(q, k, v, mask, 0.5)
    c = chunked_dropout_attention(q, k, v, mask, 0.5)
    torch.testing.assert_close(a, b)  # torch.manual_seed fixes the mask
    assert not torch.allclose(a, c)


def test_bad_dropout_is_refused():
    q, k, v, mask = inputs()
    with pytest.raises(ValueError, match="attention dropout"):
        chunked_dropout_attention(q, k, v, mask, 1.0)
