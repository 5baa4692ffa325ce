"""The fusion module alone: shapes, parameter counts per sharing level, masking; and made fast (``fast.apply``):
fused vs explicit attention, modalities joined along time, the feed-forward recomputed."""

import itertools

import pytest
import torch
from conftest import OpCount

from mmsa_emt.fast import SpeedConfig, apply, speed_config
from mmsa_emt.fast.fusion import segment_runs
from mmsa_emt.nn.emt import EMT, PositionalEmbedding

FLAGS = list(itertools.product([True, False], repeat=3))


def fast_emt(dim: int, *, fused_attention: bool = True, stack_modalities: str | None = None,
             checkpoint_fusion: bool = False, **kwargs) -> EMT:
    """An EMT built the paper's way, then made fast by ``fast.apply`` with these levers."""
    levers = speed_config(SpeedConfig(), fused_attention=fused_attention, stack_modalities=stack_modalities,
                          checkpoint_fusion=checkpoint_fusion)
    return apply(EMT(dim, **kwargs), levers)


def half_mpu_params(d: int, mult: int = 4) -> int:
    """Hand count of one half-MPU as the authors build it: 4 LayerNorms, 2 attentions, a GEGLU feed-forward."""
    layer_norms = 4 * 2 * d
    attention = d * d + 2 * d * d + (d * d + d)  # q, kv (no bias), out (bias)
    feed_forward = (d * 2 * mult * d + 2 * mult * d) + (mult * d * d + d)
    return layer_norms + 2 * attention + feed_forward


def pool_params(d: int, m: int = 3) -> int:
    return (m * d) * (m * d) + m * d + m * d + 1


def inputs(b=3, d=16, lengths=((10, 4, 1), (7, 7, 2), (5, 3, 5)), seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(b, 3, d, generator=g)
    local = [torch.randn(b, max(ls), d, generator=g) for ls in lengths]
    masks = [torch.arange(max(ls))[None] < torch.tensor(ls)[:, None] for ls in lengths]
    return context, local, masks


@pytest.mark.parametrize("mpu_share,modality_share,layer_share", FLAGS)
def test_shapes_and_parameter_count_for_every_sharing_level(mpu_share, modality_share, layer_share):
    d, depth = 16, 3
    emt = EMT(d, depth=depth, heads=4, mpu_share=mpu_share, modality_share=modality_share, layer_share=layer_share)
    context, local, masks = inputs(d=d)
    out_context, out_local = emt(context, [x.clone() for x in local], masks)
    assert out_context.shape == (3, 3, d)
    assert [x.shape for x in out_local] == [x.shape for x in local]
    n_mpu = (1 if mpu_share else 2) * (1 if modality_share else 3) * (1 if layer_share else depth)
    n_pool = 1 if layer_share else depth
    assert sum(p.numel() for p in emt.parameters()) == n_mpu * half_mpu_params(d) + n_pool * pool_params(d)


def test_padding_is_masked():
    emt = EMT(16, depth=2, heads=4).eval()
    context, local, masks = inputs()
    ref_context, ref_local = emt(context, [x.clone() for x in local], masks)
    noisy = [torch.where(m[..., None], x, torch.randn_like(x) * 100) for x, m in zip(local, masks)]
    new_context, new_local = emt(context, noisy, masks)
    torch.testing.assert_close(new_context, ref_context)
    for a, b, m in zip(new_local, ref_local, masks):
        torch.testing.assert_close(a[m], b[m])


def test_fused_and_explicit_attention_agree():
    fused = fast_emt(16, depth=2, heads=4, mpu_share=False).eval()
    explicit = EMT(16, depth=2, heads=4, mpu_share=False).eval()  # the paper's: explicit, as the authors
    explicit.load_state_dict(fused.state_dict())
    context, local, masks = inputs()
    a, la = fused(context, [x.clone() for x in local], masks)
    b, lb = explicit(context, [x.clone() for x in local], masks)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for x, y, m in zip(la, lb, masks):
        torch.testing.assert_close(x[m], y[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mpu_share,layer_share", list(itertools.product([True, False], repeat=2)))
def test_stacked_modalities_compute_what_the_loop_computes(fused, mpu_share, layer_share):
    """One fusion call for all modalities, joined along time (with fused or explicit attention) = the paper's
    one call per modality: same outputs and the same gradients for every parameter and input (float64, training
    mode with dropout off), even at padded steps."""
    kwargs = dict(depth=3, heads=4, mpu_share=mpu_share, layer_share=layer_share, modality_share=True)
    loop = EMT(16, **kwargs).double().train()
    stacked = fast_emt(16, stack_modalities="time", fused_attention=fused, **kwargs).double().train()
    assert type(stacked).__name__ == "JoinedEMT"
    stacked.load_state_dict(loop.state_dict())
    results = []
    for emt in (loop, stacked):
        context, local, masks = inputs()
        context = context.double().requires_grad_()
        local = [x.double().requires_grad_() for x in local]
        out_context, out_local = emt(context, list(local), masks)
        loss = out_context.square().sum() + sum((y * m[..., None]).sum() for y, m in zip(out_local, masks))
        loss.backward()
        results.append((out_context, out_local, context.grad, [x.grad for x in local],
                        {n: p.grad for n, p in emt.named_parameters()}))
    (c1, l1, gc1, gl1, gp1), (c2, l2, gc2, gl2, gp2) = results
    torch.testing.assert_close(c2, c1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gc2, gc1, rtol=1e-10, atol=1e-10)
    for a, b, m in zip(l2, l1, inputs()[2]):
        assert a.shape == b.shape
        torch.testing.assert_close(a[m], b[m], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(gl2, gl1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp2[name], gp1[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("lengths", [((4, 4), (4, 4), (4, 4)), ((6,), (1,), (3,)), ((3, 2), (5, 5), (2, 1))])
def test_joined_modalities_with_equal_lengths_and_batch_of_one(lengths):
    """Equal segments take the stacked-on-the-batch path of the attention; a batch of one sample still works; audio
    as long as the context (3 steps) shares a run with the context's unmasked self-attention."""
    loop = EMT(16, depth=2, heads=4).double().eval()
    joined = fast_emt(16, depth=2, heads=4, stack_modalities="time").double().eval()
    joined.load_state_dict(loop.state_dict())
    context, local, masks = inputs(b=len(lengths[0]), lengths=lengths)
    (c1, l1), (c2, l2) = (emt(context.double(), [x.double() for x in local], masks) for emt in (loop, joined))
    torch.testing.assert_close(c2, c1, rtol=1e-10, atol=1e-10)
    for a, b in zip(l2, l1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_joined_modalities_keep_attention_dropout_within_each_modality():
    """With attention dropout on (CPU chunked kernel), a modality's outputs still do not depend on the others'
    frames: noise in the vision frames leaves the promoted audio sequence unchanged under the same seed."""
    emt = fast_emt(16, depth=1, heads=4, attn_dropout=0.3, stack_modalities="time").train()
    context, local, masks = inputs()
    outs = []
    for vision in (local[2], torch.randn_like(local[2]) * 50):
        torch.manual_seed(3)
        outs.append(emt(context, [local[0], local[1], vision], masks)[1])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert not torch.allclose(outs[0][2], outs[1][2])


def test_joined_fusion_attends_to_the_context_without_a_mask(monkeypatch):
    """Joined along time, every attention whose keys are the context G (always valid) runs without a mask, and
    every attention over frames gets its modality's mask."""
    from mmsa_emt.fast.fusion import FastAttention as Attention

    calls, attend = [], Attention._attend

    def recording(self, q, k, v, mask):
        calls.append((k.shape[2], mask is None))
        return attend(self, q, k, v, mask)

    monkeypatch.setattr(Attention, "_attend", recording)
    context, local, masks = inputs()  # frames 10, 7, 5; the context has 3 tokens
    fast_emt(16, depth=2, heads=4, stack_modalities="time").eval()(context, local, masks)
    assert {keys for keys, unmasked in calls if unmasked} == {3}
    assert {keys for keys, unmasked in calls if not unmasked} == {10, 7, 5}


def test_run_masks_from_one_mask_per_segment():
    from mmsa_emt.fast.fusion import run_masks

    a, b = torch.tensor([[True, False], [True, True]]), torch.tensor([[True, True], [False, True]])
    # runs: 2 segments of 2 keys stacked, then 1 of 3 keys
    masks = run_masks([None, a, None], [(2, 1, 2), (1, 1, 3)])
    assert masks[1] is None
    torch.testing.assert_close(masks[0], torch.cat([torch.ones(2, 2, dtype=torch.bool), a])[:, None, None, :])
    joined = run_masks(torch.cat([a, b, torch.ones(2, 3, dtype=torch.bool)], dim=1), [(2, 1, 2), (1, 1, 3)])
    torch.testing.assert_close(joined[0], torch.cat([a, b])[:, None, None, :])
    assert joined[1].shape == (2, 1, 1, 3)
    with pytest.raises(ValueError, match="2 key masks for 3 key segments"):
        run_masks([a, b], [(2, 1, 2), (1, 1, 3)])


def test_segments_group_into_runs_of_equal_lengths_and_must_add_up():
    assert segment_runs([3, 3, 3, 9], [4, 2, 3, 3], queries=18, keys=12) == [(1, 3, 4), (1, 3, 2), (1, 3, 3),
                                                                              (1, 9, 3)]
    assert segment_runs([3, 3, 3, 4, 2], [3, 3, 3, 4, 2], queries=15, keys=15) == [(3, 3, 3), (1, 4, 4), (1, 2, 2)]
    with pytest.raises(ValueError, match=r"do not pair up 10 queries with 6 keys"):
        segment_runs([3, 3], [3, 3], queries=10, keys=6)


def test_stacking_needs_modality_sharing():
    assert type(fast_emt(16, depth=1, heads=4, stack_modalities="time")).__name__ == "JoinedEMT"
    assert type(fast_emt(16, depth=1, heads=4, modality_share=False, stack_modalities="time")) is EMT
    with pytest.raises(ValueError, match="stack_modalities=True"):
        SpeedConfig(stack_modalities=True)


def test_unshared_copies_start_identical_like_the_authors():
    emt = EMT(8, depth=2, heads=2, mpu_share=False, modality_share=False, layer_share=False)
    first, second = emt.layers[0][0][0], emt.layers[1][2][1]
    assert first is not second
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_positional_embedding_sinusoid_odd_width_and_learnable_limit():
    pe = PositionalEmbedding(5)
    table = pe.sinusoid(4, torch.device("cpu"), torch.float32)[0]
    assert table.shape == (4, 5)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))  # sin(0)=0, cos(0)=1
    assert torch.isclose(table[1, 0], torch.sin(torch.tensor(1.0)))
    learnable = PositionalEmbedding(4, max_len=8, learnable=True)
    assert sum(p.numel() for p in learnable.parameters()) == 32
    with pytest.raises(ValueError, match="max_seq_len"):
        learnable(torch.zeros(1, 9, 4))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="d_model=10.*heads=4"):
        EMT(10, depth=1, heads=4)


def test_feed_forward_checkpointing_recomputes_and_changes_nothing():
    """``checkpoint_ff``: the LN + FFN of each half-MPU run again in backward (counted); outputs and gradients are
    those without it, feed-forward dropout included (float64, same seed)."""
    results, calls = [], []
    for flag in (False, True):
        torch.manual_seed(0)
        emt = fast_emt(16, depth=2, heads=4, ff_dropout=0.3, checkpoint_fusion=flag).double().train()
        count = []
        emt.layers[0][0][0].ff.proj_in.register_forward_hook(lambda *_, count=count: count.append(1))
        context, local, masks = inputs()
        context = context.double().requires_grad_()
        torch.manual_seed(1)
        out, promoted = emt(context, [x.double() for x in local], masks)
        (out.square().sum() + sum(y.sum() for y in promoted)).backward()
        results.append((out, context.grad, {n: p.grad for n, p in emt.named_parameters()}))
        calls.append(len(count))
    assert calls[1] == 2 * calls[0]
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
    for name, grad in p1.items():
        torch.testing.assert_close(p2[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("lengths", [((10, 4, 1), (7, 7, 2), (5, 3, 5)), ((6,), (1,), (3,)), ((4, 4), (4, 4), (4, 4))])
@pytest.mark.parametrize("case", ["train", "eval", "bf16"])
def test_joined_fusion_makes_each_mask_additive_once_and_computes_the_same(lengths, case):
    """Fused attention joined along time: each key mask is made an additive bias once per forward (0 / -inf in the
    queries' dtype, rows 8-aligned), not by PyTorch at each attention call using it. Outputs and gradients are
    those of the boolean masks bit for bit: in training (the CPU's chunked dropout kernel, same seed), in
    evaluation (SDPA) and under bf16 autocast, for unequal lengths, a frame run shared with the context's unmasked
    self-attention, and equal lengths (one stacked run); and it launches fewer operations."""
    torch.manual_seed(0)
    emt = fast_emt(16, depth=2, heads=4, attn_dropout=0.3, stack_modalities="time").train(case == "train")
    context, local, masks = inputs(b=len(lengths[0]), lengths=lengths)
    results = []
    for additive in (False, True):
        emt.additive_masks = additive  # the attention stays fused either way; only the masks' conversion changes
        emt.zero_grad(set_to_none=True)
        x = [t.clone().requires_grad_() for t in (context, *local)]
        torch.manual_seed(1)
        with OpCount() as ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16"):
            c, promoted = emt(x[0], x[1:], masks)
            loss = (c.float() ** 2).sum() + sum((h.float() * torch.randn_like(h.float())).sum() for h in promoted)
        loss.backward()
        results.append(([c, *promoted, *(t.grad for t in x), *(p.grad for p in emt.parameters())], ops.n))
    (plain, n_plain), (biased, n_biased) = results
    for a, b in zip(biased, plain):
        assert torch.equal(a, b)
    assert n_biased < n_plain


def test_additive_mask_rows_are_aligned_for_the_memory_efficient_kernel():
    from mmsa_emt.fast.sdpa import additive_mask

    mask = torch.tensor([[True, True, False], [True, False, False]])
    bias = additive_mask(mask[:, None, None, :], torch.bfloat16)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert all(stride % 8 == 0 for stride in bias.stride()[:-1]) and bias.stride(-1) == 1
    assert bias[..., 0].eq(0).all() and torch.isneginf(bias[1, ..., 1:]).all() and bias[0, ..., 1] == 0


def test_joined_fusion_in_float64_runs_under_autocast():
    """Autocast leaves float64 alone, so the additive masks are made in float64 too (a bf16 mask would be refused
    by the attention next to float64 queries)."""
    emt = fast_emt(16, depth=1, heads=4, stack_modalities="time").double().eval()
    context, local, masks = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, promoted = emt(context.double(), [x.double() for x in local], masks)
    assert out.dtype == torch.float64 and all(h.dtype == torch.float64 for h in promoted)
