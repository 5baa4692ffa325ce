"""Fast mode computes what the faithful baseline mode computes (fp32): same losses and gradients."""

import pytest
import torch
from conftest import random_batch

from mmsa_emt import EMTDLFR, LossWeights, compute_loss
from mmsa_emt.trainer import SpeedConfig


def losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = compute_loss(model, batch, LossWeights())
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.terms.items()} | {"total": out.total.detach()}, grads


def padded_batch(b: int, dtype: torch.dtype):
    """A batch with extra text padding that trimming removes, floats in ``dtype``."""
    batch = random_batch(b, text_len=12, audio_len=15, vision_len=11, rate=0.4, seed=5)
    pad = lambda t: torch.cat([t, torch.zeros(*t.shape[:-1], 6)], dim=-1)  # noqa: E731
    batch.text, batch.text_m, batch.text_dropped = pad(batch.text), pad(batch.text_m), pad(batch.text_dropped)
    for name in ("audio", "audio_m", "vision", "vision_m", "labels"):
        setattr(batch, name, getattr(batch, name).to(dtype))
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_mode_computes_what_the_baseline_mode_computes(tiny_config, dtype):
    """Fast: fused attention kernel, both views in one pass, padding trimmed. Baseline: explicit attention
    matrices, two passes, full padding (the authors' way). In float64 losses and every gradient agree to 1e-9;
    in float32 the losses agree to 1e-5 (the gradients of this tiny random model are too ill-conditioned by the
    BatchNorm heads, whose batch variance of near-identical [CLS] vectors is tiny, to compare at 1e-5)."""
    torch.manual_seed(0)
    baseline = EMTDLFR(tiny_config(fused_attention=False, fused_views=False)).train().to(dtype)
    fast = EMTDLFR(tiny_config(fused_attention=True, fused_views=True)).train().to(dtype)
    fast.load_state_dict(baseline.state_dict())
    for model in (baseline, fast):  # training mode (BatchNorm on batch statistics) without BERT's dropout
        model.text_encoder.eval()
    batch = padded_batch(16, dtype)
    trimmed = SpeedConfig(trim_padding=True).prepare(batch, "cpu")
    assert trimmed.text.shape[-1] == 12 and batch.text.shape[-1] == 18

    ref_terms, ref_grads = losses_and_grads(baseline, batch)
    terms, grads = losses_and_grads(fast, trimmed)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    for key, value in ref_terms.items():  # cosine terms are differences of O(1) numbers: relative to max(|v|, 1)
        assert abs(terms[key] - value) <= tolerance * max(abs(value), 1.0), (key, terms[key].item(), value.item())
    assert grads.keys() == ref_grads.keys()
    if dtype == torch.float64:
        scale = max(g.abs().max() for g in ref_grads.values())
        for name, grad in ref_grads.items():
            assert (grads[name] - grad).abs().max() <= 1e-9 * scale, name


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp8'"):
        SpeedConfig(precision="fp8")


def test_bf16_autocast_runs_on_cpu(tiny_config):
    model = EMTDLFR(tiny_config()).train()
    speed = SpeedConfig(precision="bf16")
    with speed.autocast("cpu"):
        out = compute_loss(model, random_batch(3), LossWeights())
    out.total.backward()
    assert torch.isfinite(out.total)
