"""Checkpoints written before the network and its DLFR heads were split (keys 'Model.text_encoder...',
'Model.restoration...') load into today's layout ('Model.net.text_encoder...', 'Model.restoration...').

tests/data/legacy_checkpoint.pt was written by tests/data/make_legacy_checkpoint.py at commit aab9ff3 (the last
commit of that layout): a tiny model with the tiny BERT of ``write_tiny_bert``, its state dict prefixed 'Model.' as
MMSA's AMIO saves it, and its eval-mode prediction and DLFR loss on ``random_batch(3)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_batch

from mmsa_emt import DLFR, LossWeights
from mmsa_emt.dlfr import emt_dlfr, upgrade_state_dict

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint.pt"


def test_a_checkpoint_of_the_earlier_layout_loads_and_predicts_the_same(tiny_config):
    saved = torch.load(LEGACY)
    state = saved["state_dict"]
    assert any(k.startswith("Model.text_encoder.") for k in state)  # the earlier layout
    wrapper = torch.nn.Module()  # as MMSA's AMIO holds it: the model under 'Model'
    wrapper.Model = emt_dlfr(tiny_config()).eval()
    wrapper.load_state_dict(state, strict=True)  # the pre-hook maps the keys
    batch = random_batch(3)
    with torch.no_grad():
        pred = wrapper.Model(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)["M"]
        loss = wrapper.Model.loss(batch, LossWeights()).total
    torch.testing.assert_close(pred, saved["pred"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, saved["loss"], atol=1e-6, rtol=1e-5)  # the restoration heads loaded too


def test_upgrade_maps_only_the_earlier_layout(tiny_config):
    model: DLFR = emt_dlfr(tiny_config())
    current = model.state_dict()
    assert upgrade_state_dict(current).keys() == current.keys()  # today's layout is left alone
    legacy = {k.removeprefix("net."): v for k, v in current.items()}
    assert upgrade_state_dict(legacy).keys() == current.keys()
    prefixed = {"Model." + k: v for k, v in legacy.items()} | {"other.weight": torch.zeros(1)}
    assert upgrade_state_dict(prefixed, "Model.").keys() == {"Model." + k for k in current} | {"other.weight"}
    model.load_state_dict(legacy)  # directly, without a prefix


def test_load_weights_takes_a_checkpoint_of_the_earlier_layout(tiny_config):
    """MMSA_run's reload and MMSA_test go through load_weights, which compares keys strictly: the earlier layout's
    keys are mapped before the comparison, not refused as 'missing'."""
    from mmsa_emt.mmsa.models import load_weights

    saved = torch.load(LEGACY)
    wrapper = torch.nn.Module()
    wrapper.Model = emt_dlfr(tiny_config()).eval()
    load_weights(wrapper, saved["state_dict"], source=str(LEGACY))
    batch = random_batch(3)
    with torch.no_grad():
        pred = wrapper.Model(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)["M"]
    torch.testing.assert_close(pred, saved["pred"], atol=1e-6, rtol=1e-5)
