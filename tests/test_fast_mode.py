"""The ``fast`` preset computes what the ``faithful`` one computes: same losses and gradients (float64 to 1e-9,
float32 to float rounding); and each lever of ``mmsa_emt.fast`` alone changes nothing but the work."""

import subprocess
import sys

import pytest
import torch
from conftest import OpCount, build_model, random_batch

from mmsa_emt import LossWeights, compute_loss
from mmsa_emt.fast import LEVERS, SpeedConfig, speed_config
from mmsa_emt.fast.encoders import FastBertTextEncoder
from mmsa_emt.fast.views import trimmed
from mmsa_emt.nn.encoders import BertTextEncoder


def fast_bert(tiny_bert, *, fused_qkv: bool, checkpoint: bool = False) -> FastBertTextEncoder:
    """The tiny BERT encoder built the paper's way, then made a ``FastBertTextEncoder`` (as ``fast.apply`` does)."""
    encoder = BertTextEncoder(str(tiny_bert))
    encoder.__class__ = FastBertTextEncoder
    encoder.configure(fused_qkv=fused_qkv, checkpoint=checkpoint)
    return encoder


def losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = compute_loss(model, batch, LossWeights())
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.terms.items()} | {"total": out.total.detach()}, grads


def assert_same_losses_and_grads(reference, model, batch, *, losses: tuple[float, float],
                                 grads: tuple[float, float]) -> None:
    """Both models on one batch: every loss term and every gradient agree to (rtol, atol)."""
    ref_terms, ref_grads = losses_and_grads(reference, batch)
    terms, new_grads = losses_and_grads(model, batch)
    for key, value in ref_terms.items():
        torch.testing.assert_close(terms[key], value, rtol=losses[0], atol=losses[1], msg=key)
    assert new_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(new_grads[name], grad, rtol=grads[0], atol=grads[1], msg=name)


def padded_batch(b: int, dtype: torch.dtype):
    """A batch with extra text padding that trimming removes, floats in ``dtype``."""
    batch = random_batch(b, text_len=12, audio_len=15, vision_len=11, rate=0.4, seed=5)
    pad = lambda t: torch.cat([t, torch.zeros(*t.shape[:-1], 6)], dim=-1)  # noqa: E731
    batch.text, batch.text_m, batch.text_dropped = pad(batch.text), pad(batch.text_m), pad(batch.text_dropped)
    for name in ("audio", "audio_m", "vision", "vision_m", "labels"):
        setattr(batch, name, getattr(batch, name).to(dtype))
    return batch


@pytest.mark.parametrize("stacking", [None, "time"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_mode_computes_what_the_baseline_mode_computes(tiny_config, dtype, stacking):
    """``fast`` (as on a CPU, and with the fusion's modalities joined along time as on CUDA): fused attention
    kernels, both views in one pass, padding trimmed, LSTMs over the padded batch, the fusion's feed-forward
    recomputed, BERT's q/k/v in one matmul. ``faithful``: explicit attention matrices, two passes, full padding,
    packed LSTMs (the authors' way). In float64
    losses and every gradient agree to 1e-9; in float32 the losses agree to 1e-5 (the gradients of this tiny
    random model are too ill-conditioned by the BatchNorm heads, whose batch variance of near-identical [CLS]
    vectors is tiny, to compare at 1e-5; benchmarks/check_cuda.py compares them at bert-base size)."""
    torch.manual_seed(0)
    baseline = build_model(tiny_config, "faithful").train().to(dtype)
    fast = build_model(tiny_config, "fast", stack_modalities=stacking).train().to(dtype)
    assert list(fast.state_dict()) == list(baseline.state_dict())
    fast.load_state_dict(baseline.state_dict())
    for model in (baseline, fast):  # training mode (BatchNorm on batch statistics) without BERT's dropout
        model.net.text_encoder.eval()
    batch = padded_batch(16, dtype)
    cut = speed_config("fast").prepare(batch, "cpu")
    assert cut.text.shape[-1] == 12 and batch.text.shape[-1] == 18
    assert speed_config("faithful").prepare(batch, "cpu").text.shape[-1] == 18

    ref_terms, ref_grads = losses_and_grads(baseline, batch)
    terms, grads = losses_and_grads(fast, cut)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    for key, value in ref_terms.items():  # cosine terms are differences of O(1) numbers: relative to max(|v|, 1)
        assert abs(terms[key] - value) <= tolerance * max(abs(value), 1.0), (key, terms[key].item(), value.item())
    assert grads.keys() == ref_grads.keys()
    if dtype == torch.float64:
        scale = max(g.abs().max() for g in ref_grads.values())
        for name, grad in ref_grads.items():
            assert (grads[name] - grad).abs().max() <= 1e-9 * scale, name


def test_trimmed_lengths_round_up_to_a_multiple_and_compute_the_same(tiny_config):
    """``trimmed(8)`` (CUDA's default) cuts to the longest sequences rounded up to a multiple of 8, never beyond the
    padded length, and the extra padding changes no loss and no gradient (float64)."""
    batch = padded_batch(8, torch.float64)  # text: 12 of 18 steps used; audio 15, vision 11 frames
    for name in ("audio", "audio_m", "vision", "vision_m", "audio_dropped", "vision_dropped"):
        value = getattr(batch, name)
        setattr(batch, name, torch.cat([value, torch.zeros(value.shape[0], 10, *value.shape[2:], dtype=value.dtype)],
                                       dim=1))  # 10 more frames of padding
    steps = lambda b: (b.text.shape[-1], b.audio.shape[1], b.vision.shape[1], b.vision_dropped.shape[1])  # noqa: E731
    assert steps(trimmed(batch)) == (12, 15, 11, 11)
    assert steps(trimmed(batch, 8)) == (16, 16, 16, 16)
    assert steps(trimmed(batch, 32)) == (18, 25, 21, 21)  # at most the padded lengths
    assert steps(SpeedConfig().prepare(batch, "cpu")) == (12, 15, 11, 11)  # rounding is CUDA's default only
    assert steps(SpeedConfig(trim_multiple=8).prepare(batch, "cpu")) == (16, 16, 16, 16)
    with pytest.raises(ValueError, match="trim_multiple=0"):
        SpeedConfig(trim_multiple=0)

    torch.manual_seed(0)
    model = build_model(tiny_config, fused_views=True, stack_modalities="time").train().double()
    model.net.text_encoder.eval()
    terms, grads = losses_and_grads(model, trimmed(batch))
    terms8, grads8 = losses_and_grads(model, trimmed(batch, 8))
    for key, value in terms.items():
        torch.testing.assert_close(terms8[key], value, rtol=1e-9, atol=1e-12, msg=key)
    for name, grad in grads.items():
        torch.testing.assert_close(grads8[name], grad, rtol=1e-7, atol=1e-10, msg=name)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp8'"):
        SpeedConfig(precision="fp8")


def test_bf16_autocast_runs_on_cpu(tiny_config):
    model = build_model(tiny_config).train()
    speed = SpeedConfig(precision="bf16")
    with speed.autocast("cpu"):
        out = compute_loss(model, random_batch(3), LossWeights())
    out.total.backward()
    assert torch.isfinite(out.total)


def test_removed_levers_are_accepted_only_at_their_shipped_value(tiny_config):
    """``encoder_cast_once`` (superseded), ``encoder_autocast``, ``reuse_weight_casts`` and ``cache_positions`` (no
    gain measured) were taken out: at their shipped value a config still runs, with a warning; at any other value it
    is refused, naming why; so is ``stack_modalities: "batch"``. An unknown key is refused naming the closest
    lever."""
    with pytest.warns(UserWarning, match="encoder_cast_once=False no longer does anything"):
        assert speed_config("fast", encoder_cast_once=False) == speed_config("fast")
    with pytest.warns(UserWarning, match="reuse_weight_casts=True no longer does anything .*no gain"):
        assert speed_config("fast", reuse_weight_casts=True) == speed_config("fast")
    with pytest.raises(ValueError, match="reuse_weight_casts=False: this setting was removed"):
        speed_config("faithful", reuse_weight_casts=False)
    with pytest.warns(UserWarning, match="cache_positions=True no longer does anything .*no gain"):
        assert speed_config("fast", cache_positions=True) == speed_config("fast")
    with pytest.raises(ValueError, match="cache_positions=False: this setting was removed"):
        speed_config("faithful", cache_positions=False)
    assert "reuse_weight_casts" not in LEVERS and "cache_positions" not in LEVERS
    with pytest.warns(UserWarning, match="encoder_autocast"):
        speed_config("fast", encoder_autocast=True)
    with pytest.raises(ValueError, match="encoder_cast_once=True: this setting was removed .superseded"):
        speed_config("fast", encoder_cast_once=True)
    with pytest.raises(ValueError, match="encoder_autocast=False: this setting was removed"):
        speed_config("faithful", encoder_autocast=False)
    with pytest.raises(ValueError, match='stack_modalities="batch": this setting was removed'):
        speed_config("fast", stack_modalities="batch")
    with pytest.raises(ValueError, match="unknown speed setting 'fused_atention' .did you mean 'fused_attention'"):
        speed_config("fast", fused_atention=True)
    with pytest.raises(ValueError, match="speed='quick' is not a preset; choose one of .'faithful', 'fast'"):
        speed_config("quick")


def test_presets_and_auto_values_follow_the_device():
    """``faithful`` is the authors' way, ``fast`` the shipped default; 'auto' resolves per device."""
    faithful, fast = speed_config("faithful"), speed_config("fast")
    assert (faithful.fused_attention, faithful.fused_views, faithful.packed_lstm, faithful.numpy_dropout,
            faithful.trim_padding, faithful.precision) == (False, False, True, False, False, "fp32")
    assert fast.resolved("cuda").stack_modalities == "time" and fast.resolved("cpu").stack_modalities is None
    assert fast.resolved("cpu").checkpoint_fusion is True
    assert speed_config("fast", precision="fp32").resolved("cuda").precision == "fp32"


def test_apply_swaps_classes_back_and_forth_without_touching_the_state(tiny_config):
    """``apply`` makes a paper-built model fast and, with ``faithful``, the paper's classes again: the same
    parameters, the same state-dict keys and values."""
    from mmsa_emt.dlfr import DLFR
    from mmsa_emt.fast import apply
    from mmsa_emt.nn.attention import Attention

    model = build_model(tiny_config, "faithful")
    paper_types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    apply(model, "fast", "cuda")  # as on CUDA: joined fusion too (nothing runs here)
    assert type(model) is not DLFR and type(model.net.emt).__name__ == "JoinedEMT"
    assert all(type(m) is not Attention for m in model.modules())
    apply(model, "faithful")
    assert {name: type(m) for name, m in model.named_modules()} == paper_types
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_stacked_modalities_in_the_full_model(tiny_config):
    """The stacked fusion inside the network: same losses and gradients as the per-modality loop (float64)."""
    torch.manual_seed(0)
    loop = build_model(tiny_config, fused_views=True).train().double()
    stacked = build_model(tiny_config, fused_views=True, stack_modalities="time").train().double()
    stacked.load_state_dict(loop.state_dict())
    for model in (loop, stacked):
        model.net.text_encoder.eval()
    assert_same_losses_and_grads(loop, stacked, padded_batch(8, torch.float64), losses=(1e-9, 1e-9),
                                 grads=(1e-7, 1e-9))


def test_compiled_model_computes_the_same_and_keeps_its_state_dict(tiny_config):
    """``compile: true`` compiles the encoder and the fusion in place: same losses and gradients, same state-dict
    keys (checkpoints stay interchangeable), no graph break, and a batch of other lengths runs without error. The
    fusion as shipped for CUDA: joined along time, one shared layer whose feed-forward is recomputed
    (``checkpoint_fusion``) at every call site, which crashed TorchDynamo while it traced LayerNorm's eps as an
    input. Traced through TorchDynamo and AOTAutograd with the 'aot_eager' backend: Inductor's code generation
    takes minutes on 2 CPU cores (benchmarks/bench_train.py measures the real thing). Audio and vision only:
    tracing BERT takes 40 s."""
    from torch._dynamo.utils import counters

    from mmsa_emt.trainer import compile_model

    torch.manual_seed(0)
    settings = dict(stack_modalities="time", checkpoint_fusion=True, modalities=("audio", "vision"))
    eager, compiled = build_model(tiny_config, **settings).train(), build_model(tiny_config, **settings).train()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    compile_model(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == keys
    counters.clear()
    assert_same_losses_and_grads(eager, compiled, padded_batch(8, torch.float32), losses=(1e-5, 1e-6),
                                 grads=(1e-5, 1e-6))
    other = random_batch(8, text_len=9, audio_len=7, vision_len=13, seed=3)
    assert torch.isfinite(compute_loss(compiled, other, LossWeights()).total)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_cpu_dropout_paths_compile_without_graph_breaks():
    """Inside ``torch.compile`` the CPU's numpy-masked paths (the chunked attention, ``fast.dropout.Dropout``) give way
    to torch's traceable kernels, the attention-kernel choice is read once while tracing, and the sinusoid table is
    built in the graph: no graph break, and dropout still drops (zeros, survivors scaled by 1 / (1 - p))."""
    from torch._dynamo.utils import counters

    from mmsa_emt.fast.dropout import Dropout
    from mmsa_emt.fast.fusion import FastAttention
    from mmsa_emt.nn.emt import PositionalEmbedding

    torch.manual_seed(0)
    attention, dropout = FastAttention(8, heads=2, dropout=0.5).train(), Dropout(0.5).train()
    position = PositionalEmbedding(8)
    x, mask = torch.randn(2, 6, 8), torch.arange(6)[None] < torch.tensor([[6], [3]])

    def step(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attention(position(x), key_mask=mask), dropout(x)

    counters.clear()
    attended, dropped = torch.compile(step, backend="aot_eager")(x, mask)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert attended.shape == x.shape and torch.isfinite(attended).all()
    kept = dropped != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(dropped[kept], 2 * x[kept])


@pytest.mark.parametrize("layers", [1, 2])
def test_padded_lstm_computes_what_the_packed_lstm_computes(layers):
    """Same local sequence (zeros at padded steps before the Linear), same utterance vector, same gradients of
    every weight and of the input, for lengths from 1 to the full width (float64)."""
    from mmsa_emt.fast.encoders import PaddedSequenceEncoder
    from mmsa_emt.nn.encoders import SequenceEncoder

    torch.manual_seed(0)
    packed = SequenceEncoder(5, 8, 4, num_layers=layers).double()
    padded = PaddedSequenceEncoder(5, 8, 4, num_layers=layers).double()
    padded.load_state_dict(packed.state_dict())
    lengths = torch.tensor([7, 1, 4, 7, 2])
    x = torch.randn(5, 9, 5, dtype=torch.float64)  # two columns beyond the longest sequence
    results = []
    for encoder in (packed, padded):
        inputs = x.clone().requires_grad_()
        local, utterance = encoder(inputs, lengths)
        (local.square().sum() + utterance.sin().sum()).backward()
        results.append((local, utterance, inputs.grad, {n: p.grad for n, p in encoder.named_parameters()}))
    (l1, u1, gx1, gp1), (l2, u2, gx2, gp2) = results
    assert l1.shape == l2.shape == (5, 7, 4)
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u2, u1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx2, gx1, rtol=1e-10, atol=1e-12)
    for name, grad in gp1.items():
        torch.testing.assert_close(gp2[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("packed", [True, False])
def test_lstm_runs_in_float32_under_autocast(packed):
    """Under bf16 autocast the recurrence sees float32 input with autocast off (CUDA autocast would give cuDNN's
    LSTM float16 whatever the autocast dtype); the Linear after it is autocast as usual."""
    from mmsa_emt.fast.encoders import PaddedSequenceEncoder
    from mmsa_emt.nn.encoders import SequenceEncoder

    torch.manual_seed(0)
    encoder = (SequenceEncoder if packed else PaddedSequenceEncoder)(5, 8, 4)
    seen = []
    encoder.rnn.register_forward_pre_hook(lambda _, args: seen.append((torch.is_autocast_enabled("cpu"),
                                                                        args[0].data.dtype)))
    x, lengths = torch.randn(4, 6, 5).bfloat16(), torch.tensor([6, 2, 5, 1])
    with SpeedConfig(precision="bf16").autocast("cpu"):
        local, utterance = encoder(x, lengths)
    assert seen == [(False, torch.float32)]
    assert local.dtype == utterance.dtype == torch.bfloat16  # the Linear ran under autocast


def test_encoder_checkpointing_recomputes_and_changes_nothing(tiny_config):
    """``checkpoint_encoder``: BERT's layers run again in the backward pass (counted), and losses and gradients are
    those without it, dropout included (float64, same seed)."""
    torch.manual_seed(0)
    plain = build_model(tiny_config).train().double()
    checkpointed = build_model(tiny_config, checkpoint_encoder=True).train().double()
    checkpointed.load_state_dict(plain.state_dict())
    batch = padded_batch(8, torch.float64)
    results, calls = [], []
    for model in (plain, checkpointed):
        layer = model.net.text_encoder.bert.encoder.layer[0].intermediate  # inside the checkpointed forward
        count = []
        handle = layer.register_forward_hook(lambda *_, count=count: count.append(1))
        torch.manual_seed(1)
        results.append(losses_and_grads(model, batch))
        handle.remove()
        calls.append(len(count))
    assert calls == [1, 2]
    (ref_terms, ref_grads), (terms, grads) = results
    for key, value in ref_terms.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-10, atol=1e-12, msg=key)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_bert_attention_picks_among_the_fusions_kernels(tiny_config, monkeypatch, checkpoint):
    """BERT's SDPA attention runs under fast.sdpa.fused_backends (cuDNN's kernel left out on CUDA), as the fusion's
    does; with checkpoint_encoder it keeps PyTorch's choice, which its backward recomputation also sees."""
    from torch.nn.attention import SDPBackend

    import mmsa_emt.fast.encoders as encoders

    monkeypatch.setattr(encoders, "fused_backends", lambda device: [SDPBackend.MATH])
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.mem_efficient_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = build_model(tiny_config, checkpoint_encoder=checkpoint)
    if model.net.text_encoder.bert.config._attn_implementation != "sdpa":
        pytest.fail(f"the tiny BERT uses {model.net.text_encoder.bert.config._attn_implementation!r} attention")
    model.net.text_encoder(random_batch(2).text)
    assert seen and set(seen) == {checkpoint}  # math only: the efficient kernel switched off inside BERT
    assert torch.backends.cuda.mem_efficient_sdp_enabled()  # and back on after


@pytest.mark.parametrize("case", ["fp32", "bf16", "fp64"])
def test_berts_ready_made_mask_has_the_dtype_of_its_queries(tiny_config, monkeypatch, case):
    """A float mask must have the queries' dtype for CUDA's fused kernels (the CPU's accept any float mask, so
    only this check catches a mismatch here): under bf16 autocast bf16, with BERT kept in float32 or without
    autocast float32, for a float64 model float64; and its rows are 8-aligned at any text length."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.dtype, attn_mask.dtype))
        assert all(stride % 8 == 0 for stride in attn_mask.stride()[:-1])  # no aligned copy per call on CUDA
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    encoder = build_model(tiny_config).net.text_encoder.train()
    if case == "fp64":
        encoder.double()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("bf16"))
    with autocast:
        encoder(random_batch(4).text)
    expected = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    assert seen and set(seen) == {(expected, expected)}


def test_bert_gets_a_ready_made_mask_without_the_host_sync(tiny_config, monkeypatch):
    """BERT's SDPA attention is given a ready-made 4-D additive mask, the bias PyTorch would make in every layer of
    the boolean mask transformers would build from the 2-D one: the same output, bit for bit (padded batch, dropout
    on, same seed), and transformers never asks mask.all() (a host sync on CUDA)."""
    import transformers.masking_utils as masking

    from mmsa_emt.fast.encoders import READY_MADE_MASKS

    assert READY_MADE_MASKS  # transformers >= 5 here
    asked = []
    check = masking._ignore_bidirectional_mask_sdpa
    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa",
                        lambda mask, *a, **k: asked.append(mask is not None) or check(mask, *a, **k))
    text = random_batch(4).text
    assert (text[:, 1] == 0).any()  # some padding to mask
    outputs = []
    for ready_made in (False, True):
        torch.manual_seed(0)
        encoder = build_model(tiny_config, encoder_fused_qkv=False).net.text_encoder.train()  # transformers' forward
        if not ready_made:
            monkeypatch.setattr(encoder, "attention_mask", lambda mask, dtype: mask)
        asked.clear()
        outputs.append(encoder(text))
        assert asked == ([] if ready_made else [True])
    assert torch.equal(outputs[1], outputs[0])


def encoder_run(encoder, text: torch.Tensor, seed: int, autocast: bool = False):
    """Output, every gradient (loss: sum of squares) and the non-view operation count of one training pass."""
    torch.manual_seed(seed)
    encoder.zero_grad(set_to_none=True)
    with OpCount() as ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tokens = encoder(text)
        tokens.float().square().sum().backward()
    return tokens, {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}, ops.n


@pytest.mark.parametrize("case", ["fp64", "fp32", "bf16", "eval"])
def test_fused_qkv_bert_computes_what_transformers_bert_computes(tiny_bert, tiny_config, case):
    """``encoder_fused_qkv``: BERT's layers with one query/key/value matmul give transformers' output and every
    gradient, dropout on and the same seed (the same masks: same dropout modules, same order), in fewer
    operations; in float64 to 1e-12, in float32 to 1e-5, under bf16 autocast to bf16's rounding."""
    batch = random_batch(4, text_len=12)
    assert (batch.text[:, 1] == 0).any()  # padded tokens, masked
    text = torch.cat([batch.text, batch.text_m])  # both views, as the model stacks them
    runs = []
    for fused in (False, True):
        encoder = fast_bert(tiny_bert, fused_qkv=fused)
        encoder.train(case != "eval")
        if case == "fp64":
            encoder.double()
        runs.append(encoder_run(encoder, text, seed=3, autocast=case.startswith("bf16")))
    (tokens, grads, ops), (fused_tokens, fused_grads, fused_ops) = runs
    assert fused_tokens.dtype == tokens.dtype and fused_tokens.shape == tokens.shape
    tolerance = {"fp64": 1e-12, "fp32": 1e-5, "eval": 1e-5}.get(case, 2e-2)
    torch.testing.assert_close(fused_tokens, tokens, rtol=tolerance, atol=tolerance)
    assert fused_grads.keys() == grads.keys() and len(grads) > 10  # every parameter but the frozen pooler's
    assert not any(name.startswith("bert.pooler") for name in grads)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        assert fused_grads[name].dtype == grad.dtype
        assert (fused_grads[name] - grad).abs().max() <= tolerance * max(scale, 1.0), name
    layers = encoder.bert.config.num_hidden_layers
    assert ops - fused_ops >= (10 if case.startswith("bf16") else 4) * layers  # matmuls, sums and casts saved


def test_fused_qkv_falls_back_where_it_cannot_run(tiny_bert, tiny_config, caplog):
    """With checkpoint_encoder (transformers recomputes its own layers) or a BERT it does not cover (here one with
    chunked feed-forward blocks) the encoder keeps transformers' forward, and says so."""
    import logging

    from mmsa_emt.fast.fused_bert import unsupported

    with caplog.at_level(logging.INFO, logger="mmsa_emt.fast.encoders"):
        assert not fast_bert(tiny_bert, checkpoint=True, fused_qkv=True).fused_qkv
    assert "checkpoint_encoder" in caplog.text
    encoder = fast_bert(tiny_bert, fused_qkv=True)
    assert encoder.fused_qkv and unsupported(encoder.bert) is None
    encoder.bert.config.chunk_size_feed_forward = 4
    assert "chunk_size_feed_forward" in unsupported(encoder.bert)
    assert "is not a BertModel" in unsupported(torch.nn.Linear(2, 2))
    assert build_model(tiny_config).net.text_encoder.fused_qkv  # on by default


def test_fused_qkv_bert_compiles_without_graph_breaks(tiny_bert):
    """``compile: true`` traces the fused BERT forward whole (the fusion is covered above): no graph break, and the
    same output and gradients as eager (dropout off). Traced with 'aot_eager', as above (~10 s)."""
    from torch._dynamo.utils import counters

    text = random_batch(3).text
    encoder = fast_bert(tiny_bert, fused_qkv=True).eval()
    eager_tokens, eager_grads, _ = encoder_run(encoder, text, seed=0)
    counters.clear()
    compiled = torch.compile(encoder.forward, dynamic=True, backend="aot_eager")
    encoder.zero_grad(set_to_none=True)
    tokens = compiled(text)
    tokens.float().square().sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(tokens, eager_tokens, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(encoder.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_a_failing_compiler_backend_falls_back_to_eager_with_a_warning(tiny_config, caplog):
    """``compile: true`` where the compiler backend fails (Inductor did, on an H200 with PyTorch 2.11): the part
    runs eagerly with one warning that names it and the backend's error, gives the eager numbers, and is not
    compiled again at the next call."""
    from mmsa_emt.trainer import compile_model

    tries = []

    def failing(graph: torch.fx.GraphModule, example_inputs):
        tries.append(graph)
        raise AssertionError("Node slice_1 was invalid, but is output")  # the H200's error, planted

    torch.manual_seed(0)
    settings = dict(stack_modalities="time", checkpoint_fusion=True, modalities=("audio", "vision"))
    eager, compiled = build_model(tiny_config, **settings).train(), build_model(tiny_config, **settings).train()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, backend=failing)
    batch = padded_batch(8, torch.float32)
    with caplog.at_level("WARNING", logger="mmsa_emt.trainer"):
        assert_same_losses_and_grads(eager, compiled, batch, losses=(1e-6, 1e-7), grads=(1e-6, 1e-7))
        compute_loss(compiled, batch, LossWeights()).total.backward()
    warnings = [r.getMessage() for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "on emt" in warnings[0] and "AssertionError: Node slice_1 was invalid" in warnings[0], warnings
    assert len(tries) == 1, "a part whose backend failed was compiled again"



def test_import_leaves_the_process_floating_point_mode_alone():
    """``import mmsa_emt`` changes no process-wide state of PyTorch: subnormal floats stay subnormal (flushing them
    to zero showed no gain, docs/speed.md, and would change a user's other computations in the same process)."""
    code = "import torch, mmsa_emt; print((torch.tensor([1e-39]) * 1.0).item())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(done.stdout.strip().splitlines()[-1]) != 0.0
