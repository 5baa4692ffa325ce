"""DLFR losses on hand-computed cases, and the composition of the total loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

from mmsa_emt import LossWeights, compute_loss
from mmsa_emt.dlfr import attraction_loss, emt_dlfr, masked_reconstruction_loss, negative_cosine


def test_negative_cosine_degenerate_cases():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert negative_cosine(x, x).item() == pytest.approx(-1.0)
    assert negative_cosine(x, -x).item() == pytest.approx(1.0)
    assert negative_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(0.0)
    assert negative_cosine(2 * x, x).item() == pytest.approx(-1.0)  # scale-free


def test_attraction_is_the_symmetric_mean():
    p_c, z_c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # cos 0
    p_i, z_i = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])  # p_c.z_i: cos 1; p_i.z_c: cos 1/sqrt2
    expected = 0.5 * (-(1 / 2**0.5) + -1.0)
    assert attraction_loss(p_c, z_c, p_i, z_i).item() == pytest.approx(expected)


def test_reconstruction_loss_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])  # (1, 3, 2)
    target = torch.tensor([[[1.5, 0.0], [3.0, 10.0], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # masked steps 0 and 2: |d| = 0.5, 2 | 9, 9 ; SmoothL1 (beta 1): 0.125, 1.5, 8.5, 8.5 over 4 elements
    assert masked_reconstruction_loss(pred, target, mask).item() == pytest.approx(18.625 / (4 + 1e-6))
    assert masked_reconstruction_loss(pred, target, mask, "L1Loss").item() == pytest.approx(20.5 / (4 + 1e-6))
    assert masked_reconstruction_loss(pred, target, mask, "MSELoss").item() == pytest.approx(166.25 / (4 + 1e-6))


def test_reconstruction_empty_mask_is_zero_and_full_mask_is_the_mean():
    pred, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert masked_reconstruction_loss(pred, target, torch.zeros(2, 5)).item() == 0.0
    full = masked_reconstruction_loss(pred, target, torch.ones(2, 5))
    assert full.item() == pytest.approx(F.smooth_l1_loss(pred, target).item(), rel=1e-5)
    with pytest.raises(ValueError, match="recon_loss='Huber'"):
        masked_reconstruction_loss(pred, target, torch.ones(2, 5), "Huber")


def test_reconstruction_targets_only_dropped_valid_steps(tiny_config):
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config()).eval()
    batch = random_batch(3, rate=0.5, seed=3)
    with torch.no_grad():
        out = compute_loss(model, batch, LossWeights())
        incomplete = out.view
        steps = incomplete.local["audio"].shape[1]
        pred = model.restoration.reconstructors["audio"](incomplete.local["audio"])
        dropped = batch.audio_dropped[:, :steps].bool()
        by_hand = F.smooth_l1_loss(pred[dropped], batch.audio[:, :steps][dropped], reduction="sum")
        by_hand = by_hand / (dropped.sum() * batch.audio.shape[-1] + 1e-6)
    assert dropped.any()
    assert out.terms["recon_audio"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_total_loss_uses_the_authors_weighting(tiny_config):
    model = emt_dlfr(tiny_config()).eval()
    weights = LossWeights(attraction=0.3, reconstruction=0.7)
    with torch.no_grad():
        out = compute_loss(model, random_batch(4, rate=0.4), weights)
    t = out.terms
    attraction = t["attract_context"] + t["attract_text"] + t["attract_audio"] + t["attract_vision"]
    expected = t["pred_incomplete"] + 0.3 * (attraction + t["pred_complete"]) + 0.7 * (
        t["recon_text"] + t["recon_audio"] + t["recon_vision"])
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(t[f"recon_{m}"] > 0 for m in ("text", "audio", "vision"))


def test_at_rate_zero_the_views_coincide(tiny_config):
    model = emt_dlfr(tiny_config()).eval()
    with torch.no_grad():
        out = compute_loss(model, random_batch(4, rate=0.0), LossWeights())
    torch.testing.assert_close(out.pred, out.pred_complete)
    assert all(out.terms[f"recon_{m}"].item() == 0.0 for m in ("text", "audio", "vision"))


def test_stop_gradient_on_the_projector_outputs(tiny_config):
    model = emt_dlfr(tiny_config()).train()
    heads = model.restoration
    x_c, x_i = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    (z_c, p_c), (z_i, p_i) = heads.simsiam("vision", x_c), heads.simsiam("vision", x_i)
    assert not z_c.requires_grad and not z_i.requires_grad
    attraction_loss(p_c, z_c, p_i, z_i).backward()
    assert heads.predictors["vision"].net[0].weight.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_both_views_through_the_heads_at_once_equal_two_calls(tiny_config, training):
    """``fast.views.stacked_simsiam`` (x_c ++ x_i) with the stacked attraction loss: the z, p, loss, every gradient
    and the BatchNorm running statistics of one call per view followed by Eq. 13 as written (float64)."""
    import copy

    from mmsa_emt.fast.views import stacked_attraction_losses, stacked_simsiam

    torch.manual_seed(0)
    heads = emt_dlfr(tiny_config()).restoration.double().train(training)
    twin = copy.deepcopy(heads)
    x_c, x_i = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64) * 3 + 1
    (z_c, p_c), (z_i, p_i) = twin.simsiam("vision", x_c), twin.simsiam("vision", x_i)
    separate = attraction_loss(p_c, z_c, p_i, z_i)
    z, p = stacked_simsiam(heads, "vision", torch.cat([x_c, x_i]))
    stacked = stacked_attraction_losses([p], [z])[0]
    torch.testing.assert_close(z, torch.cat([z_c, z_i]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, torch.cat([p_c, p_i]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stacked, separate, rtol=1e-12, atol=1e-12)
    separate.backward()
    stacked.backward()
    for (name, a), b in zip(heads.named_parameters(), twin.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), b in zip(heads.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)  # running stats: view c, then view i
    assert heads.predictors["vision"].net[1].num_batches_tracked.item() == (2 if training else 0)


def test_attraction_losses_of_all_heads_at_once_are_each_heads_own():
    """``stacked_attraction_losses``: heads of different widths, zero-padded and stacked, give each head's
    ``attraction_loss`` (Eq. 13 as written, on its views) and the same gradients (float64; z detached as SimSiam's
    stop-gradient)."""
    from mmsa_emt.fast.views import stacked_attraction_losses

    g = torch.Generator().manual_seed(0)
    widths = [6, 2, 9, 9]
    p = [torch.randn(8, w, generator=g, dtype=torch.float64, requires_grad=True) for w in widths]
    z = [torch.randn(8, w, generator=g, dtype=torch.float64) * (k + 1) for k, w in enumerate(widths)]
    together = stacked_attraction_losses(p, z)
    assert together.shape == (len(widths),)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)
    (weights @ together).backward()
    grads = [t.grad.clone() for t in p]
    for k, (p_k, z_k) in enumerate(zip(p, z)):
        p_k.grad = None
        alone = attraction_loss(p_k[:4], z_k[:4], p_k[4:], z_k[4:])  # views: rows 0-3 complete, 4-7 not
        torch.testing.assert_close(together[k], alone, rtol=1e-12, atol=1e-12)
        (weights[k] * alone).backward()
        torch.testing.assert_close(grads[k], p_k.grad, rtol=1e-12, atol=1e-12)
