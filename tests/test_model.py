"""The whole network: shapes, batch size 1, gradients to every parameter, masking, parameter counts per part."""

import itertools

import pytest
import torch
from conftest import random_batch

from mmsa_emt import DLFR, EMTDLFR, LossWeights, compute_loss
from mmsa_emt.dlfr import emt_dlfr
from mmsa_emt.nn.encoders import EncoderNotFoundError
from mmsa_emt.registry import get_builder, list_models
from mmsa_emt.trainer import OptimConfig, build_optimizer


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_forward_shapes_for_every_sharing_combination(tiny_config, flags):
    model = emt_dlfr(tiny_config(mpu_share=flags[0], modality_share=flags[1], layer_share=flags[2]))
    batch = random_batch(4)
    view = model.net.forward_view(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)
    assert view.pred.shape == (4, 1)
    assert view.context.shape == (4, 3 * 16)
    assert view.utterance["text"].shape == (4, 32)  # the tiny encoder's width, not a configured 768
    assert view.local["text"].shape == (4, 9, 16)  # tokens after [CLS]
    assert view.local["audio"].shape == (4, int(batch.audio_lengths.max()), 16)
    assert view.local["vision"].shape == (4, int(batch.vision_lengths.max()), 16)


def test_a_new_network_is_wholly_in_training_mode(tiny_config):
    """transformers' from_pretrained returns BERT in eval mode; a new network must not hide it in training (BERT's
    dropout would be off for anyone who trains without calling train() first)."""
    model = emt_dlfr(tiny_config())
    assert all(module.training for module in model.modules())


def test_batch_size_one_inference_and_mmsa_call_without_lengths(tiny_config):
    model = emt_dlfr(tiny_config()).eval()
    batch = random_batch(1, rate=0.0)
    with torch.no_grad():
        out = model(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)
        full = model(batch.text, batch.audio[:, : int(batch.audio_lengths[0])],
                     batch.vision[:, : int(batch.vision_lengths[0])])  # MMSA_test passes no lengths
        loss = compute_loss(model, batch, LossWeights())
    assert out["M"].shape == (1, 1)
    torch.testing.assert_close(out["M"], full["M"])
    assert torch.isfinite(loss.total)


def test_batch_of_one_in_training_gives_a_clear_error(tiny_config):
    model = emt_dlfr(tiny_config()).train()
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_loss(model, random_batch(1), LossWeights())


def test_every_trainable_parameter_gets_a_gradient(tiny_config):
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config(mpu_share=False, modality_share=False, layer_share=False)).train()
    batch = random_batch(4, rate=0.5)
    batch.labels = torch.full((4,), 5.0)  # far above every prediction: the L1 signs cannot cancel to zero
    out = compute_loss(model, batch, LossWeights())
    out.total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".pooler." in n for n in frozen)  # only BERT's unused pooler
    build_optimizer(model, OptimConfig())  # asserts every trainable parameter is in exactly one group


def test_padding_changes_no_output(tiny_config):
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config()).eval()
    batch = random_batch(3, rate=0.0)
    with torch.no_grad():
        ref = model.net.forward_view(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)
        text = batch.text.clone()
        pad = text[:, 1] == 0
        text[:, 0][pad] = 150.0  # other token ids under the attention mask's zeros
        text[:, 2][pad] = 1.0
        audio_pad = torch.arange(batch.audio.shape[1])[None] >= batch.audio_lengths[:, None]
        vision_pad = torch.arange(batch.vision.shape[1])[None] >= batch.vision_lengths[:, None]
        audio = batch.audio + 50 * audio_pad[..., None] * torch.randn_like(batch.audio)
        vision = batch.vision + 50 * vision_pad[..., None] * torch.randn_like(batch.vision)
        new = model.net.forward_view(text, audio, vision, batch.audio_lengths, batch.vision_lengths)
    assert pad.any() and audio_pad.any() and vision_pad.any()
    torch.testing.assert_close(new.pred, ref.pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.context, ref.context, atol=1e-5, rtol=1e-5)
    for m in ("audio", "vision"):
        steps = torch.arange(ref.local[m].shape[1])[None] < getattr(batch, f"{m}_lengths")[:, None]
        torch.testing.assert_close(new.local[m][steps], ref.local[m][steps], atol=1e-5, rtol=1e-5)


def test_parameter_counts_per_part_match_hand_counts(tiny_config):
    model = emt_dlfr(tiny_config())
    counts = model.parameter_counts()
    e, d, ao, vo = 32, 16, 4, 6  # tiny encoder width, d_model, audio_out, vision_out
    lstm = lambda f, h, out: 4 * h * (f + h) + 8 * h + h * out + out  # noqa: E731
    assert counts["audio LSTM"] == lstm(5, 8, ao)
    assert counts["vision LSTM"] == lstm(7, 8, vo)
    assert counts["projections"] == (e + ao + vo) * d  # bias-free
    p = 8  # post_fusion_dim
    assert counts["prediction head"] == (e + ao + vo + 3 * d) * p + p + p * p + p + p + 1
    dims = {"context": (3 * d, 8), "text": (e, 8), "audio": (ao, 2), "vision": (vo, 3)}
    assert counts["DLFR projectors"] == sum(D * D + D for D, _ in dims.values())
    assert counts["DLFR predictors"] == sum(D * P + 2 * P + P * D + D for D, P in dims.values())
    assert counts["DLFR reconstruction"] == (d * e + e) + (d * 5 + 5) + (d * 7 + 7)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_registry_lists_and_builds_models(tiny_config):
    assert list_models() == ["emt-dlfr"]
    assert get_builder("EMT_DLFR") is get_builder("emt-dlfr")
    built = get_builder("EMT-DLFR")(tiny_config())
    assert isinstance(built, DLFR) and isinstance(built.net, EMTDLFR)  # the network wrapped by its objective
    with pytest.raises(KeyError, match="emt-dlfr"):
        get_builder("mult")


def test_offline_hub_name_gives_a_clear_error(tiny_config):
    with pytest.raises(EncoderNotFoundError, match="local folder holding config.json"):
        emt_dlfr(tiny_config(pretrained="bert-base-uncased-not-cached"))


def test_folder_without_config_gives_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(EncoderNotFoundError, match="without config.json"):
        emt_dlfr(tiny_config(pretrained=str(tmp_path)))


@pytest.mark.parametrize("modalities", [("audio", "vision"), ("text", "vision"), ("text",), ("audio",)])
def test_any_subset_of_modalities(tiny_config, modalities):
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config(modalities=modalities)).train()
    assert model.net.emt.pools[0].score[0].in_features == len(modalities) * 16  # pooling over M contexts of M*d
    assert hasattr(model.net, "text_encoder") == ("text" in modalities)
    batch = random_batch(4, rate=0.5)
    batch.labels = torch.full((4,), 5.0)
    out = compute_loss(model, batch, LossWeights())
    assert out.view.context.shape == (4, len(modalities) * 16)
    assert {k for k in out.terms if k.startswith(("attract_", "recon_"))} == {
        "attract_context", *(f"attract_{m}" for m in modalities), *(f"recon_{m}" for m in modalities)}
    out.total.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ValueError, match="non-empty subset"):
        emt_dlfr(tiny_config(modalities=("smell",)))


def test_the_papers_modules_never_import_the_speed_machinery():
    """model.py, dlfr.py and nn/*.py compute the paper's way: none of them imports ``mmsa_emt.fast`` (parsed,
    relative and absolute imports alike), and the network config holds no how-to-compute switch."""
    import ast
    import dataclasses
    from pathlib import Path

    import mmsa_emt
    from mmsa_emt import EMTDLFRConfig
    from mmsa_emt.fast import LEVERS

    package = Path(mmsa_emt.__file__).parent
    paper = [package / "model.py", package / "dlfr.py", *sorted((package / "nn").glob("*.py"))]
    assert len(paper) >= 5
    for path in paper:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
                resolved = [("." * node.level) + name for name in names]
                assert not any(n.startswith(("mmsa_emt.fast", ".fast", "..fast")) or (node.level and n == "fast")
                               for n in resolved), f"{path.name} imports {resolved}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mmsa_emt.fast") for a in node.names), path.name
    assert not {f.name for f in dataclasses.fields(EMTDLFRConfig)} & {*LEVERS, "encoder_cast_once",
                                                                       "encoder_autocast"}
