"""End to end through MMSA's own entry points on synthetic data in MMSA's .pkl format, on the CPU."""

import ast
import pickle
import random
from pathlib import Path

import MMSA.run as mmsa_run
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FEATURE_FILES, run_dirs
from MMSA import MMSA_run, MMSA_test

import mmsa_emt
from mmsa_emt.mmsa.config import load_config
from mmsa_emt.mmsa.models import AMIO

SCALES = {"mosi": 0.03, "mosei": 0.003, "sims": 0.03}  # about 40 training samples each


def read_results(csv) -> pd.DataFrame:
    """MMSA's results CSV: one row per run, each metric a '(mean, std)' pair of plain numbers."""
    frame = pd.read_csv(csv)
    for column in frame.columns[1:]:
        frame[column] = [ast.literal_eval(cell) for cell in frame[column]]  # fails on 'np.float64(...)'
    return frame


@pytest.mark.parametrize("preset", ["mosi", "mosei", "sims"])
def test_mmsa_run_end_to_end(workspace, tmp_path, preset):
    config = workspace(preset, scale=SCALES[preset])
    MMSA_run("EMT-DLFR", preset, config_file=str(config), seeds=[1, 2], gpu_ids=[], num_workers=0,
             **run_dirs(tmp_path))
    frame = read_results(tmp_path / "results" / "normal" / f"{preset}.csv")
    assert list(frame["Model"]) == ["emt-dlfr"]
    expected = {"MAE", "Corr", "Loss"} | ({"Mult_acc_2", "F1_score"} if preset == "sims" else {"Non0_acc_2"})
    assert expected <= set(frame.columns)
    for column in frame.columns[1:]:
        mean, std = frame[column][0]
        assert isinstance(mean, float) and isinstance(std, float) and np.isfinite(mean)
    checkpoints = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert checkpoints == [f"emt-dlfr-{preset}-seed1.pth", f"emt-dlfr-{preset}-seed2.pth"]


def test_same_seed_twice_gives_identical_metrics_and_keeps_both_checkpoints(workspace, tmp_path):
    config = workspace("mosi", scale=SCALES["mosi"])
    for _ in range(2):
        MMSA_run("emt_dlfr", "mosi", config_file=str(config), seeds=[7], gpu_ids=[], num_workers=0,
                 **run_dirs(tmp_path))
    frame = read_results(tmp_path / "results" / "normal" / "mosi.csv")
    assert len(frame) == 2
    assert frame.iloc[0, 1:].tolist() == frame.iloc[1, 1:].tolist()
    names = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert names == ["emt-dlfr-mosi-seed7-1.pth", "emt-dlfr-mosi-seed7.pth"]
    first, second = (torch.load(tmp_path / "models" / n)["state_dict"] for n in names)  # weights with their config
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tune_mode_runs_two_trials(workspace, tmp_path, monkeypatch):
    config = workspace("mosi", scale=SCALES["mosi"], tune=True)
    random.seed(0)  # MMSA reseeds from the clock before each draw; fix the draws instead
    monkeypatch.setattr(mmsa_run.random, "seed", lambda *args, **kwargs: None)
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[3], is_tune=True, tune_times=2, gpu_ids=[],
             num_workers=0, **run_dirs(tmp_path))
    frame = pd.read_csv(tmp_path / "results" / "tune" / "mosi-emt-dlfr.csv")
    assert len(frame) == 2
    assert {"d_model", "fusion_layers", "learning_rate_bert", "MAE"} <= set(frame.columns)
    assert frame[["d_model", "fusion_layers", "learning_rate_bert", "attn_dropout"]].drop_duplicates().shape[0] == 2
    assert list((tmp_path / "models").iterdir()) == []  # MMSA deletes each trial's weights


def test_builtin_mmsa_model_still_runs_from_our_config(workspace, tmp_path):
    config = workspace("mosi", scale=SCALES["mosi"])
    MMSA_run("TFN", "mosi", config_file=str(config), config={"early_stop": 1}, seeds=[1], gpu_ids=[],
             num_workers=0, **run_dirs(tmp_path))
    frame = read_results(tmp_path / "results" / "normal" / "mosi.csv")
    assert list(frame["Model"]) == ["tfn"]
    assert np.isfinite(frame["MAE"][0][0])


def test_mmsa_test_predicts_from_saved_weights(workspace, tmp_path):
    config = workspace("mosi", scale=SCALES["mosi"])
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[5], gpu_ids=[], num_workers=0,
             **run_dirs(tmp_path))
    weights = tmp_path / "models" / "emt-dlfr-mosi-seed5.pth"
    with open(tmp_path / "dataset" / FEATURE_FILES["mosi"], "rb") as f:
        test = pickle.load(f)["test"]
    sample = {"text": test["text"][0], "text_bert": test["text_bert"][0], "audio": test["audio"][0],
              "vision": test["vision"][0], "audio_lengths": test["audio_lengths"][0],
              "vision_lengths": test["vision_lengths"][0]}  # the frames after these are padding
    feature_path = tmp_path / "sample.pkl"
    feature_path.write_bytes(pickle.dumps(sample))

    args = load_config("EMT-DLFR", "mosi", config)
    prediction = MMSA_test(dict(args), str(weights), str(feature_path), gpu_id=-1)

    args["feature_dims"] = [768, sample["audio"].shape[1], sample["vision"].shape[1]]
    model = AMIO(args)
    model.load_state_dict(torch.load(weights))  # strict: our checkpoint holds exactly the model's keys
    model.eval()
    as_batch = lambda key: torch.from_numpy(sample[key]).float()[None]  # noqa: E731
    with torch.no_grad():
        expected = model(as_batch("text_bert"), as_batch("audio"), as_batch("vision"),
                         torch.tensor([sample["audio_lengths"]]), torch.tensor([sample["vision_lengths"]]))["M"].item()
    assert isinstance(float(prediction), float)
    assert float(prediction) == pytest.approx(expected, abs=1e-6)


def test_learns_a_planted_signal(workspace, tmp_path):
    """Test MAE clearly below the constant predictor that always says the training-label mean."""
    config = workspace("mosi", scale=0.2, seed=1, signal_audio=3.0, signal_vision=3.0,
                       common={"max_epochs": 6, "early_stop": 6, "update_epochs": 1, "missing_rate": [0, 0, 0]},
                       model={"learning_rate_other": 3e-3, "learning_rate_video": 1e-3, "attn_dropout": 0.0,
                              "ff_dropout": 0.0, "post_fusion_dropout": 0.0, "batch_size": 16})
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0,
             **run_dirs(tmp_path))
    mae = read_results(tmp_path / "results" / "normal" / "mosi.csv")["MAE"][0][0] / 100
    with open(tmp_path / "dataset" / FEATURE_FILES["mosi"], "rb") as f:
        data = pickle.load(f)
    y_test = np.asarray(data["test"]["regression_labels"])
    constant = np.abs(y_test - np.mean(data["train"]["regression_labels"])).mean()
    assert mae < 0.7 * constant, (mae, constant)  # measured: 0.49 against 1.20


def test_registration_is_idempotent():
    mmsa_emt.register()
    mmsa_emt.register()
    assert mmsa_run.AMIO is AMIO
    assert mmsa_run.SUPPORTED_MODELS.count("EMT-DLFR") == 1


def test_epoch_and_sample_results_for_mmsa_sena_path(workspace, tmp_path):
    """MMSA's M-SENA path asks for per-epoch results and per-sample predictions and features."""
    config = workspace("mosi", scale=SCALES["mosi"])
    args = load_config("EMT-DLFR", "mosi", config)
    args.update(model_save_path=tmp_path / "m.pth", device=torch.device("cpu"), train_mode="regression",
                custom_feature=None, feature_T=None, feature_A=None, feature_V=None, cur_seed=1)
    torch.manual_seed(0)
    out = mmsa_run._run(args, num_workers=0, from_sena=True)
    epochs = out["epoch_results"]
    assert len(epochs["train"]) == len(epochs["valid"]) == len(epochs["test"]) == 2  # max_epochs
    test = out["final_results"]["test"]
    n = len(test["Ids"])
    assert n == len(test["SResults"]) == len(test["Labels"]) == 21
    assert test["Features"]["Feature_t"].shape == (n, 32) and test["Features"]["Feature_f"].shape == (n, 48)
    assert len(set(test["Ids"])) == n


def test_feature_file_is_read_once_per_loader(workspace, monkeypatch):
    """The check and MMSA's three datasets share one read of the feature file (MMSA alone unpickles it once per
    split), and the datasets hold exactly what MMSA's own loader gives; pickle is MMSA's again afterwards."""
    import os

    import MMSA.data_loader as mmsa_data_loader

    from mmsa_emt.mmsa.config import trial_args
    from mmsa_emt.mmsa.data import _mmsa_data_loader, checked_data_loader, checked_test_loader

    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    feature_file = os.path.realpath(args["featurePath"])
    reference = _mmsa_data_loader(args, 0)  # MMSA's own: three reads
    reads, real_load = [], pickle.load

    def counting_load(file, *a, **k):
        reads.append(os.path.realpath(file.name))
        return real_load(file, *a, **k)

    monkeypatch.setattr(pickle, "load", counting_load)
    loaders = checked_data_loader(args, 0)
    assert reads.count(feature_file) == 1
    for split in ("train", "valid", "test"):
        ours, theirs = loaders[split].dataset, reference[split].dataset
        for name in ("text", "text_m", "audio", "audio_m", "vision", "vision_m", "audio_lengths", "vision_lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(ours, name)), np.asarray(getattr(theirs, name)),
                                          err_msg=f"{split}/{name}")
        np.testing.assert_array_equal(ours.labels["M"], theirs.labels["M"])
    reads.clear()
    test = checked_test_loader(args, 0)
    assert reads.count(feature_file) == 1 and len(test.dataset) == len(reference["test"].dataset)
    assert mmsa_data_loader.pickle is pickle


def test_test_loaders_at_several_rates_share_one_read(workspace, monkeypatch):
    """A model tested at several missing rates: the feature file is read once for all of them, and each loader is
    exactly the one built from its own read (its own missing masks; MMSA's datasets do not change the shared
    content)."""
    import os

    from mmsa_emt.mmsa.config import trial_args
    from mmsa_emt.mmsa.data import at_missing_rates, checked_test_loader, checked_test_loaders

    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    feature_file = os.path.realpath(args["featurePath"])
    at_rates = [at_missing_rates(args, rates, Path("unused")) for rates in ([0.2] * 3, [0.7] * 3, [0.0, 0.5, 1.0])]
    separate = [checked_test_loader(a, 0).dataset for a in at_rates]
    reads, real_load = [], pickle.load

    def counting_load(file, *a, **k):
        reads.append(os.path.realpath(file.name))
        return real_load(file, *a, **k)

    monkeypatch.setattr(pickle, "load", counting_load)
    shared = [loader.dataset for loader in checked_test_loaders(at_rates, 0)]
    assert reads.count(feature_file) == 1
    for rates, ours, theirs in zip(at_rates, shared, separate, strict=True):
        for name in ("text_m", "audio_m", "vision_m", "audio", "labels"):
            a, b = getattr(ours, name), getattr(theirs, name)
            a, b = (a["M"], b["M"]) if name == "labels" else (a, b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{rates['missing_rate']}/{name}")
    assert not np.array_equal(shared[0].audio_m, shared[1].audio_m)  # the rates did make different views
