"""Weights that carry their config: the trainer's checkpoint format, from_pretrained, MMSA's reload and MMSA_test."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from conftest import FEATURE_FILES, random_batch, run_dirs
from MMSA import MMSA_run, MMSA_test

import mmsa_emt
from mmsa_emt import DLFR, checkpoint
from mmsa_emt.checkpoint import CheckpointError
from mmsa_emt.dlfr import emt_dlfr
from mmsa_emt.mmsa.config import load_config
from mmsa_emt.mmsa.models import AMIO
from mmsa_emt.trainer import BestCheckpoint

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint.pt"


@pytest.fixture
def trained(workspace, tmp_path):
    """(config file, checkpoint written by MMSA_run, the model MMSA reloaded from it, the test split)."""
    config = workspace("mosi")
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), config={"max_epochs": 1}, seeds=[4], gpu_ids=[],
             num_workers=0, **run_dirs(tmp_path))
    weights = tmp_path / "models" / "emt-dlfr-mosi-seed4.pth"
    with open(tmp_path / "dataset" / FEATURE_FILES["mosi"], "rb") as f:
        test = pickle.load(f)["test"]
    args = load_config("EMT-DLFR", "mosi", config)
    args.update(feature_dims=[768, test["audio"].shape[2], test["vision"].shape[2]], device="cpu")
    reference = AMIO(args)
    reference.load_state_dict(torch.load(weights))  # as MMSA's _run reloads the best weights
    return config, weights, reference.eval(), test


def _inputs(test: dict, n: int = 6) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(test["text_bert"][:n]).float(), torch.from_numpy(test["audio"][:n]).float(),
            torch.from_numpy(test["vision"][:n]).float(), torch.as_tensor(test["audio_lengths"][:n]),
            torch.as_tensor(test["vision_lengths"][:n]))


def test_checkpoint_holds_weights_config_and_encoder_config_as_plain_data(trained, tiny_bert):
    _, weights, reference, _ = trained
    saved = torch.load(weights, weights_only=True)  # plain data only
    assert saved["format"] == checkpoint.FORMAT and saved["version"] == checkpoint.VERSION
    assert saved["model_name"] == "emt-dlfr" and saved["prefix"] == "Model."
    assert saved["config"]["pretrained"] == str(tiny_bert) and saved["config"]["d_model"] == 16
    assert saved["encoder_config"]["model_type"] == "bert" and saved["encoder_config"]["hidden_size"] == 32
    assert saved["settings"]["missing_rate"] == [0.5, 0.5, 0.5] and saved["settings"]["max_epochs"] == 1
    assert saved["state_dict"].keys() == reference.state_dict().keys()


def test_from_pretrained_rebuilds_the_trained_model_without_config_or_encoder_files(trained, monkeypatch):
    _, weights, reference, test = trained

    def no_loading(*args, **kwargs):
        raise AssertionError("the encoder was loaded from its folder or the hub")

    monkeypatch.setattr("mmsa_emt.nn.encoders.load_pretrained_encoder", no_loading)
    model = DLFR.from_pretrained(weights)
    assert isinstance(model, DLFR) and not model.training
    assert model.config.modalities == ("text", "audio", "vision")
    with torch.no_grad():  # the reference computes the fast way (mmsa_emt.fast): equal up to float rounding
        torch.testing.assert_close(model(*_inputs(test))["M"], reference(*_inputs(test))["M"], rtol=1e-5, atol=1e-6)
    assert isinstance(mmsa_emt.from_pretrained(weights, map_location="cpu"), DLFR)


def test_a_weight_only_file_loads_with_a_config_and_without_one_says_what_to_pass(tmp_path, tiny_config):
    saved = torch.load(LEGACY)
    plain = tmp_path / "weights-only.pth"
    torch.save(saved["state_dict"], plain)  # a plain state dict, in the earlier key layout, 'Model.'-prefixed
    with pytest.raises(CheckpointError, match=r"weights-only\.pth holds weights only, no model config: pass .*"
                                              r"config=EMTDLFRConfig"):
        DLFR.from_pretrained(plain)
    model = DLFR.from_pretrained(plain, config=tiny_config())
    batch = random_batch(3)
    with torch.no_grad():
        pred = model(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)["M"]
    torch.testing.assert_close(pred, saved["pred"], atol=1e-6, rtol=1e-5)


def test_mmsa_test_builds_the_model_from_the_stored_config(trained, tmp_path):
    config, weights, reference, test = trained
    sample = {"text_bert": test["text_bert"][0], "audio": test["audio"][0], "vision": test["vision"][0],
              "audio_lengths": test["audio_lengths"][0], "vision_lengths": test["vision_lengths"][0]}
    path = tmp_path / "sample.pkl"
    path.write_bytes(pickle.dumps(sample))
    args = dict(load_config("EMT-DLFR", "mosi", config))
    args["post_fusion_dim"] = 24  # another network: the checkpoint's own config is used, not this one
    prediction = MMSA_test(args, str(weights), str(path), gpu_id=-1)
    with torch.no_grad():
        expected = reference(*_inputs(test, 1))["M"].item()
    assert float(prediction) == pytest.approx(expected, abs=1e-6)
    wrong = {**sample, "audio": sample["audio"][:, :3]}
    path.write_bytes(pickle.dumps(wrong))
    with pytest.raises(ValueError, match=r"audio features are 3 wide, but the model was trained on 5-wide"):
        MMSA_test(args, str(weights), str(path), gpu_id=-1)


def test_a_newer_format_version_is_refused(tmp_path, tiny_config):
    model = emt_dlfr(tiny_config())
    packed = checkpoint.package(model.state_dict(), config=model.config,
                                encoder_config=checkpoint.encoder_config_of(model))
    torch.save({**packed, "version": checkpoint.VERSION + 1}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match=r"new\.pth is an mmsa-emt checkpoint of format version 2"):
        DLFR.from_pretrained(tmp_path / "new.pth")
    torch.save(packed, tmp_path / "now.pth")
    rebuilt = DLFR.from_pretrained(tmp_path / "now.pth")  # no prefix: saved from the bare model
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("background", [False, True])  # True: written by a thread, as fit does on CUDA
def test_best_checkpoint_with_its_config_reads_back(tmp_path, tiny_config, background):
    """fit's reload of the best weights (from the file, or from memory after a background write) and the file
    written both hold the packaged format."""
    model = emt_dlfr(tiny_config())
    best = BestCheckpoint(tmp_path / "best.pth", prefix="Model.", meta=checkpoint.metadata(model, {}),
                          background=background)
    best.save(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    best.load_into(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    saved = torch.load(tmp_path / "best.pth", weights_only=True)
    assert checkpoint.is_packaged(saved) and saved["state_dict"].keys() == {f"Model.{k}" for k in before}
    rebuilt = DLFR.from_pretrained(tmp_path / "best.pth", map_location=torch.device("cpu"))
    assert dataclasses.replace(rebuilt.config, encoder_config=None) == model.config  # plus the encoder's config
