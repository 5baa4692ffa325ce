"""Optional: numerical parity with the authors' released code (GitHub sunlicai/EMT-DLFR).

Runs only when EMT_DLFR_REFERENCE points at a checkout of that repository (it is not a dependency and nothing of
it is copied here). Both models get the same weights, mapped by name, and must give the same outputs.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_batch
from easydict import EasyDict

from mmsa_emt import LossWeights, compute_loss
from mmsa_emt.dlfr import emt_dlfr
from mmsa_emt.fast import apply, speed_config
from mmsa_emt.mmsa.config import model_config_from_args

REFERENCE = os.environ.get("EMT_DLFR_REFERENCE")
pytestmark = pytest.mark.skipif(not REFERENCE, reason="set EMT_DLFR_REFERENCE to a checkout of sunlicai/EMT-DLFR")

RENAMES = [("text_model.model.", "text_encoder.bert."), ("audio_model.linear_1.", "audio_encoder.proj."),
           ("video_model.linear_1.", "vision_encoder.proj."), ("audio_model.", "audio_encoder."),
           ("video_model.", "vision_encoder."), ("proj_text.", "projections.text."),
           ("proj_audio.", "projections.audio."), ("proj_video.", "projections.vision."),
           ("post_fusion_layer_1.", "head.1."), ("post_fusion_layer_2.", "head.3."),
           ("post_fusion_layer_3.", "head.5."), ("recon_text.", "restoration.reconstructors.text."),
           ("recon_audio.", "restoration.reconstructors.audio."),
           ("recon_video.", "restoration.reconstructors.vision.")]
HEADS = {"gmc_tokens": "context", "text": "text", "audio": "audio", "video": "vision"}


def reference_to_ours(name: str) -> str | None:
    """Maps a parameter name of the authors' EMT_DLFR to ours (None for their fixed position table)."""
    if name.endswith("pos_embed.pe"):
        return None
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    for old, new in HEADS.items():
        for kind in ("projector", "predictor"):
            if name.startswith(f"{old}_{kind}."):
                return f"restoration.{kind}s.{new}." + name.split(".", 1)[1]
    parts = name.split(".")
    if parts[1] == "attn_pools":  # fusion.attn_pools.L.attention.I.w
        return f"emt.pools.{parts[2]}.score.{parts[4]}.{parts[5]}"
    layer, modality, direction, block, rest = parts[2], parts[3], parts[4], int(parts[7]), parts[8:]
    prefix = f"emt.layers.{layer}.{modality}.{direction}."
    if rest[0] == "norm":
        return prefix + ("norm_cross", "norm_self", "norm_ff")[block] + "." + rest[1]
    if rest[0] == "norm_context":
        return prefix + "norm_context." + rest[1]
    if block == 2:  # fn.net.0 / fn.net.2 of the GEGLU feed-forward
        return prefix + "ff." + {"0": "proj_in", "2": "proj_out"}[rest[2]] + "." + rest[3]
    return prefix + ("cross_attn", "self_attn")[block] + "." + rest[1] + "." + rest[2]


@pytest.fixture
def reference_model(tiny_bert: Path, tmp_path: Path):
    root = tmp_path / "reference_root"
    (root / "pretrained_berts").mkdir(parents=True)
    (root / "pretrained_berts" / "bert_en").symlink_to(tiny_bert)
    sys.path.insert(0, REFERENCE)
    import config.get_data_root as data_root  # the reference's own module, read at import of its encoder

    data_root.data_root = str(root)
    from models.missingTask.EMT_DLFR import EMT_DLFR

    def build(args: dict):
        return EMT_DLFR(EasyDict({**args, "language": "en", "fusion_method": None}))

    yield build
    sys.path.remove(REFERENCE)


@pytest.mark.parametrize("speed", ["faithful", "fast"])
@pytest.mark.parametrize("shares", [(True, True, True), (False, False, False), (True, False, True)])
def test_same_outputs_as_the_reference(reference_model, tiny_bert, shares, speed):
    """The paper's modules as built (``faithful``) and made fast (``fast``, here with the fusion's modalities
    joined along time as on CUDA) give the reference's predictions, SimSiam vectors and reconstructions."""
    args = dict(need_data_aligned=False, use_finetune=True, feature_dims=[32, 5, 7], a_lstm_hidden_size=8,
                v_lstm_hidden_size=8, a_lstm_layers=1, v_lstm_layers=1, a_lstm_dropout=0.0, v_lstm_dropout=0.0,
                text_out=32, audio_out=4, video_out=6, d_model=16, fusion_layers=2, heads=2, learnable_pos_emb=False,
                emb_dropout=0.0, attn_dropout=0.0, ff_dropout=0.0, ff_expansion=4, mpu_share=shares[0],
                modality_share=shares[1], layer_share=shares[2], attn_act_fn="tanh", gmc_tokens_pred_dim=8,
                text_pred_dim=8, audio_pred_dim=2, video_pred_dim=3, post_fusion_dim=8, post_fusion_dropout=0.0,
                pretrained=str(tiny_bert), model_name="emt-dlfr")
    torch.manual_seed(0)
    theirs = reference_model(args).eval()
    ours = apply(emt_dlfr(model_config_from_args(args)), speed_config(speed, stack_modalities="time")).eval()
    mapped = {reference_to_ours(k): v for k, v in theirs.state_dict().items() if reference_to_ours(k)}
    ours.load_state_dict(mapped, strict=True)

    batch = random_batch(4, rate=0.5, seed=1)
    with torch.no_grad():
        ref = theirs((batch.text, batch.text_m), (batch.audio, batch.audio_m, batch.audio_lengths),
                     (batch.vision, batch.vision_m, batch.vision_lengths))
        out = compute_loss(ours, batch, LossWeights())
        heads = ours.restoration
        z_text, p_text = heads.simsiam("text", out.view.utterance["text"])
        recon_audio = heads.reconstructors["audio"](out.view.local["audio"])
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # noqa: E731
    close(out.pred_complete, ref["pred"].reshape(-1))
    close(out.pred, ref["pred_m"].reshape(-1))
    close(z_text, ref["z_text_m"])
    close(p_text, ref["p_text_m"])
    close(recon_audio, ref["audio_recon"])
