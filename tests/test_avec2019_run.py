"""AVEC2019 end to end: E-DAIC layout -> prepare-avec2019 -> MMSA_run('EMT-DLFR', 'avec2019') -> CCC/MAE."""

import ast
import json
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_dirs
from MMSA import MMSA_run

from mmsa_emt.avec2019 import write_synthetic_edaic
from mmsa_emt.cli import main
from mmsa_emt.metrics import concordance_cc
from mmsa_emt.robustness import sweep

PARTICIPANTS = {"train": list(range(300, 312)), "valid": list(range(400, 404)), "test": list(range(600, 605))}


@pytest.fixture
def avec_config(tmp_path, tiny_bert, capsys):
    root = write_synthetic_edaic(tmp_path / "edaic", PARTICIPANTS, broken=["305"], frames=(120, 100))
    out = tmp_path / "dataset" / "AVEC2019" / "Processed" / "unaligned.pkl"
    main(["prepare-avec2019", "--root", str(root), "--out", str(out), "--tokenizer", str(tiny_bert),
          "--text-len", "32", "--frames", "16"])
    printed = capsys.readouterr().out
    assert "305" in printed and "OpenFace" in printed  # the broken participant is reported, with the file
    config = json.loads((REPO / "config" / "config_regression.json").read_text())
    config["datasetCommonParams"]["dataset_root_dir"] = "dataset"
    entry = config["emt-dlfr"]
    entry["commonParams"].update(max_epochs=2, early_stop=2, update_epochs=1)
    entry["datasetParams"]["avec2019"].update(pretrained=str(tiny_bert), d_model=16, batch_size=4,
                                              a_lstm_hidden_size=8, v_lstm_hidden_size=8, post_fusion_dim=16)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def results(tmp_path) -> pd.DataFrame:
    frame = pd.read_csv(tmp_path / "results" / "normal" / "avec2019.csv")
    return frame


@pytest.mark.parametrize("modalities", [None, ["audio", "vision"]])
def test_emt_dlfr_trains_on_avec2019_and_reports_ccc(avec_config, tmp_path, modalities):
    overrides = {"modalities": modalities} if modalities else {}
    MMSA_run("EMT-DLFR", "avec2019", config_file=str(avec_config), config=overrides, seeds=[1], gpu_ids=[],
             num_workers=0, **run_dirs(tmp_path))
    frame = results(tmp_path)
    assert {"CCC", "MAE", "RMSE", "Pearson", "Loss"} <= set(frame.columns)
    mae, _ = ast.literal_eval(frame["MAE"][0])  # MMSA writes (mean, std), in percent
    assert 0 < mae < 2500
    with open(tmp_path / "dataset" / "AVEC2019" / "Processed" / "unaligned.pkl", "rb") as f:
        data = pickle.load(f)
    assert len(data["train"]["id"]) == 11 and set(np.unique(data["test"]["regression_labels"])) <= set(range(25))


def test_robustness_sweep_on_avec2019(avec_config, tmp_path):
    result = sweep("EMT-DLFR", "avec2019", avec_config, rates=[0.0, 1.0], seeds=[1], out_dir=tmp_path / "out",
                   progress=False, echo=lambda _: None)
    assert {"CCC", "RMSE", "Pearson r"} <= set(result.auilc.columns)
    assert (tmp_path / "out" / "robustness_avec2019_per-rate.png").is_file()


def test_ccc_in_results_matches_a_hand_computation(avec_config, tmp_path):
    """The trainer's CCC on the test set equals Lin's formula applied to its own predictions."""
    from mmsa_emt.mmsa.config import trial_args
    from mmsa_emt.mmsa.data import checked_data_loader
    from mmsa_emt.mmsa.trainer import EMTDLFRTrainer

    args = trial_args("EMT-DLFR", "avec2019", avec_config)
    args["model_save_path"] = tmp_path / "m.pth"
    loaders = checked_data_loader(args, 0)
    from mmsa_emt.mmsa.models import AMIO

    model = AMIO(args)
    out = EMTDLFRTrainer(args).do_test(model, loaders["test"], mode="TEST", return_sample_results=True)
    preds, labels = np.asarray(out["SResults"]), np.asarray(out["Labels"])
    assert out["CCC"] == pytest.approx(round(concordance_cc(preds, labels), 4), abs=1e-4)
    assert out["MAE"] == pytest.approx(np.abs(preds - labels).mean(), abs=1e-4)
