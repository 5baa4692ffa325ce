"""The shipped configs: complete for MMSA, the authors' hyper-parameters, paths relative to the config file."""

import json
from pathlib import Path

import MMSA
import pytest
import torch
from conftest import REPO

from mmsa_emt.mmsa.config import load_config, model_config_from_args, optim_config_from_args, speed_config_from_args

REGRESSION, TUNE = REPO / "config" / "config_regression.json", REPO / "config" / "config_tune.json"
DATASETS = ("mosi", "mosei", "sims")
PAPER = {  # issue table: the authors' hyper-parameters per dataset
    "mosi": dict(batch_size=32, learning_rate_bert=5e-5, learning_rate_audio=1e-3, learning_rate_video=1e-4,
                 learning_rate_other=1e-3, weight_decay_bert=1e-3, weight_decay_audio=1e-2, weight_decay_video=1e-3,
                 weight_decay_other=1e-3, a_lstm_hidden_size=32, v_lstm_hidden_size=64, d_model=128, fusion_layers=3,
                 attn_dropout=0.3, ff_dropout=0.1, post_fusion_dim=256, post_fusion_dropout=0.3,
                 loss_attra_weight=1, loss_recon_weight=1, pretrained="bert-base-uncased"),
    "mosei": dict(batch_size=16, learning_rate_bert=2e-5, learning_rate_audio=1e-4, learning_rate_video=1e-4,
                  learning_rate_other=1e-4, weight_decay_bert=1e-3, weight_decay_audio=1e-3, weight_decay_video=1e-3,
                  weight_decay_other=1e-3, a_lstm_hidden_size=16, v_lstm_hidden_size=32, d_model=128,
                  fusion_layers=2, attn_dropout=0, ff_dropout=0, post_fusion_dim=128, post_fusion_dropout=0,
                  loss_attra_weight=1, loss_recon_weight=1, pretrained="bert-base-uncased"),
    "sims": dict(batch_size=32, learning_rate_bert=2e-5, learning_rate_audio=1e-3, learning_rate_video=1e-3,
                 learning_rate_other=1e-3, weight_decay_bert=1e-3, weight_decay_audio=0, weight_decay_video=0,
                 weight_decay_other=0, a_lstm_hidden_size=16, v_lstm_hidden_size=32, d_model=32, fusion_layers=4,
                 attn_dropout=0, ff_dropout=0, post_fusion_dim=256, post_fusion_dropout=0,
                 loss_attra_weight=0.5, loss_recon_weight=0.5, pretrained="bert-base-chinese"),
}
COMMON = dict(heads=4, ff_expansion=4, emb_dropout=0, text_out=768, audio_out=16, video_out=32, early_stop=8,
              update_epochs=4, mpu_share=True, modality_share=True, layer_share=True, attn_act_fn="tanh",
              recon_loss="SmoothL1Loss", gmc_tokens_pred_dim=128, text_pred_dim=256, audio_pred_dim=8,
              video_pred_dim=16, missing_seed=[111, 1111, 11111], use_finetune=True, data_missing=True)


@pytest.mark.parametrize("dataset", DATASETS)
def test_emt_dlfr_regression_config_has_the_paper_values(dataset):
    args = load_config("EMT-DLFR", dataset, REGRESSION)
    for key, value in {**PAPER[dataset], **COMMON}.items():
        assert args[key] == value, key
    assert args["model_name"] == "emt-dlfr"
    model_config_from_args({**args, "feature_dims": [768, 5, 20]})  # every key the model needs is there
    optim_config_from_args(args)


@pytest.mark.parametrize("device,stacked,precision", [("cpu", None, "fp32"), ("cuda:0", "time", "bf16")])
def test_shipped_speed_settings_resolve_per_device(device, stacked, precision, monkeypatch):
    """Fast mode by default; 'auto' levers follow the run's device (joining the modalities pays on CUDA, costs on
    a CPU; bf16 where the device has it natively, here a CPU without and a GPU with it)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    args = {**load_config("EMT-DLFR", "mosi", REGRESSION), "feature_dims": [768, 5, 20], "device": torch.device(device)}
    assert args["speed"] == "fast"
    speed = speed_config_from_args(args)
    assert (speed.fused_attention, speed.fused_views, speed.packed_lstm) == (True, True, False)
    assert speed.stack_modalities is stacked
    assert speed.checkpoint_fusion is True  # recomputing the fusion's feed-forward: far less memory, few launches
    assert speed.checkpoint_encoder is False  # costs more time than it saves RAM (docs/speed.md)
    assert (speed.trim_padding, speed.precision, speed.compile) == (True, precision, False)
    assert speed_config_from_args({**args, "precision": "fp32"}).precision == "fp32"
    assert speed_config_from_args({**args, "stack_modalities": False}).stack_modalities is None
    faithful = speed_config_from_args({**args, "speed": "faithful"})
    assert (faithful.fused_attention, faithful.fused_views, faithful.packed_lstm, faithful.precision) == (
        False, False, True, "fp32")
    with pytest.raises(ValueError, match='stack_modalities="batch": this setting was removed'):
        speed_config_from_args({**args, "stack_modalities": "batch"})
    with pytest.raises(ValueError, match="stack_modalities=True"):
        speed_config_from_args({**args, "stack_modalities": True})
    with pytest.raises(ValueError, match="speed='fastest' is not a preset"):
        speed_config_from_args({**args, "speed": "fastest"})


def test_a_config_written_before_the_presets_computes_as_before():
    """No ``speed`` key: the keys a config had then, and their old defaults where absent (fp32, no joined fusion,
    nothing recomputed); the removed ``encoder_cast_once``/``encoder_autocast`` at their shipped values run with a
    warning that they do nothing."""
    import warnings

    args = {**load_config("EMT-DLFR", "mosi", REGRESSION), "device": torch.device("cpu")}
    del args["speed"]
    bare = speed_config_from_args(args)
    assert (bare.precision, bare.stack_modalities, bare.checkpoint_fusion) == ("fp32", None, False)
    assert (bare.fused_attention, bare.fused_views, bare.packed_lstm, bare.numpy_dropout) == (True, True, False, True)
    old = {**args, "fused_attention": True, "stack_modalities": "auto", "checkpoint_fusion": True, "precision": "fp32",
           "encoder_autocast": True, "encoder_cast_once": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        speed = speed_config_from_args(old)
    assert sorted(str(w.message).split("=")[0] for w in caught) == ["encoder_autocast", "encoder_cast_once"]
    assert (speed.stack_modalities, speed.checkpoint_fusion) == (None, True)
    with pytest.raises(ValueError, match="encoder_autocast=False: this setting was removed"):
        speed_config_from_args({**args, "encoder_autocast": False})


@pytest.mark.parametrize("dataset", DATASETS)
def test_feature_paths_resolve_into_the_repository_dataset_folder(dataset):
    args = load_config("emt_dlfr", dataset, REGRESSION)
    expected = {"mosi": "MOSI/Processed/unaligned_50.pkl", "mosei": "MOSEI/Processed/unaligned_50.pkl",
                "sims": "SIMS/Processed/unaligned_39.pkl"}[dataset]
    assert args["featurePath"] == str(REPO / "dataset" / expected)


@pytest.mark.parametrize("dataset", DATASETS)
def test_tune_config_draws_from_the_search_space(dataset):
    raw = json.loads(TUNE.read_text())["emt-dlfr"]["debugParams"]
    args = load_config("EMT-DLFR", dataset, TUNE, tune=True)
    assert len(raw["d_paras"]) >= 6
    for key in raw["d_paras"]:
        assert args[key] in raw[key], key
    model_config_from_args({**args, "feature_dims": [768, 5, 20]})


@pytest.mark.parametrize("path", [REGRESSION, TUNE])
def test_every_mmsa_builtin_model_is_in_our_configs(path):
    ours = json.loads(path.read_text())
    theirs = json.loads((Path(MMSA.__file__).parent / "config" / path.name).read_text())
    assert set(theirs) - {"datasetCommonParams"} <= set(ours)
    for model in set(theirs) - {"datasetCommonParams"}:
        for dataset in theirs[model].get("datasetParams", {}):
            load_config(model, dataset, path, tune=path == TUNE)


@pytest.mark.parametrize("device,native,precision", [("cpu", True, "bf16"), ("cpu", False, "fp32"),
                                                     ("cuda", True, "bf16"), ("cuda", False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(device, native, precision, monkeypatch):
    """'auto' is bf16 on CPUs with AMX-BF16 and on GPUs with native bf16 (Ampere on), fp32 on the others (a V100,
    a laptop CPU), where bf16 would be emulated or slower."""
    asked = []
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": native, "avx2": True})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    args = {**load_config("EMT-DLFR", "mosi", REGRESSION), "device": torch.device(device)}
    assert args["speed"] == "fast" and "precision" not in args  # the preset's: auto
    assert speed_config_from_args(args).precision == precision
    assert asked == ([False] if device == "cuda" else [])  # emulated bf16 does not count
    assert speed_config_from_args({**args, "precision": "fp32"}).precision == "fp32"


def test_auto_precision_on_older_torch(monkeypatch):
    """Without ``including_emulation`` (torch < 2.4) the card's compute capability decides (bf16 units from Ampere,
    sm_80, on); without ``torch.cpu.get_capabilities`` a CPU keeps fp32."""
    from mmsa_emt.trainer import auto_precision

    def old_is_bf16_supported():  # no keyword: calling it with including_emulation raises TypeError
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_is_bf16_supported)
    for capability, precision in (((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert auto_precision("cuda") == precision
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert auto_precision("cpu") == "fp32"

