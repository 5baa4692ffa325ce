"""Bad input through MMSA_run: a clear error naming the file, split, key or setting, never a crash inside torch."""

import json
import pickle
import shutil
from pathlib import Path

import MMSA
import numpy as np
import pytest
from conftest import FEATURE_FILES, run_dirs
from MMSA import MMSA_run

from mmsa_emt.data_check import FeatureFileError
from mmsa_emt.mmsa.config import load_config


def run(config, tmp_path, model="EMT-DLFR", dataset="mosi"):
    MMSA_run(model, dataset, config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0, **run_dirs(tmp_path))


def edit_data(tmp_path, change, preset="mosi"):
    path = tmp_path / "dataset" / FEATURE_FILES[preset]
    data = pickle.loads(path.read_bytes())
    change(data)
    path.write_bytes(pickle.dumps(data))


def edit_config(config, change):
    raw = json.loads(config.read_text())
    change(raw)
    config.write_text(json.dumps(raw))


def test_missing_feature_file_names_the_path_and_the_config_keys(workspace, tmp_path):
    config = workspace()
    edit_config(config, lambda c: c["datasetCommonParams"]["mosi"]["unaligned"].update(featurePath="MOSI/nope.pkl"))
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl.*dataset_root_dir='dataset'.*featurePath"):
        run(config, tmp_path)


@pytest.mark.parametrize("split,key,change,message", [
    ("train", "regression_labels", lambda d: d["train"]["regression_labels"].__setitem__(3, np.nan), "NaN|inf"),
    ("valid", "vision", lambda d: d["valid"].pop("vision"), "vision"),
    ("test", "audio_lengths", lambda d: d["test"]["audio_lengths"].__setitem__(2, 99), "99"),
    ("train", "text_bert", lambda d: d["train"].__setitem__("text_bert", d["train"]["text_bert"][:, :2]), "3"),
])
def test_broken_feature_file_names_split_and_key(workspace, tmp_path, split, key, change, message):
    config = workspace()
    edit_data(tmp_path, change)
    with pytest.raises(FeatureFileError) as error:
        run(config, tmp_path)
    text = str(error.value)
    assert "unaligned_50.pkl" in text and f"'{split}'" in text and f"'{key}'" in text
    assert error.match(message)


def test_nonfinite_audio_and_vision_are_zeroed_with_one_warning(workspace, tmp_path):
    config = workspace()

    def poison(data):
        data["train"]["audio"][0, 0, 0] = np.nan
        data["valid"]["vision"][1, 0, :] = np.inf

    edit_data(tmp_path, poison)
    with pytest.warns(UserWarning, match=r"NaN/inf values in train/audio: 1, valid/vision: 20; zeroed"):
        run(config, tmp_path)
    row = (tmp_path / "results" / "normal" / "mosi.csv").read_text().splitlines()[1]
    assert "nan" not in row.lower()


def test_missing_config_key_is_named(workspace, tmp_path):
    config = workspace()
    edit_config(config, lambda c: c["emt-dlfr"]["datasetParams"]["mosi"].pop("d_model"))
    with pytest.raises(KeyError, match="config key 'd_model' is missing"):
        run(config, tmp_path)


def test_bad_missing_rate_is_named(workspace, tmp_path):
    config = workspace(common={"missing_rate": [0.5, 2.0, 0.0]})
    with pytest.raises(ValueError, match=r"missing_rate must be three numbers in \[0, 1\]"):
        run(config, tmp_path)


def test_encoder_with_another_unk_id_is_refused(workspace, tmp_path, tiny_bert):
    bert = tmp_path / "other_bert"
    shutil.copytree(tiny_bert, bert)
    tokens = (bert / "vocab.txt").read_text().splitlines()
    tokens[99], tokens[100] = tokens[100], tokens[99]
    (bert / "vocab.txt").write_text("\n".join(tokens))
    config = workspace(model={"pretrained": str(bert)})
    with pytest.raises(ValueError, match="puts \\[UNK\\] at id 99"):
        run(config, tmp_path)


def test_offline_hub_name_says_to_use_a_local_folder(workspace, tmp_path):
    config = workspace(model={"pretrained": "bert-base-uncased-offline-test"})
    with pytest.raises(OSError, match="set 'pretrained' in your config to a local folder"):
        run(config, tmp_path)


def test_unknown_names_list_the_known_ones(workspace):
    config = workspace()
    with pytest.raises(KeyError, match="dataset 'iemocap'.*mosei, mosi, sims"):
        load_config("EMT-DLFR", "iemocap", config)
    with pytest.raises(KeyError, match="model 'nonet'.*emt-dlfr"):
        load_config("nonet", "mosi", config)
    mmsa_own = Path(MMSA.__file__).parent / "config" / "config_regression.json"
    with pytest.raises(KeyError, match="give no config_file.*python -m mmsa_emt write-configs"):
        load_config("EMT-DLFR", "mosi", mmsa_own)  # MMSA's own config has no entry for it


def test_a_feature_file_that_does_not_unpickle_is_named_and_the_config_is_not_blamed(workspace, tmp_path):
    config = workspace()
    path = tmp_path / "dataset" / FEATURE_FILES["mosi"]
    path.write_bytes(path.read_bytes()[:1000])  # an interrupted download
    with pytest.raises(FeatureFileError) as error:
        run(config, tmp_path)
    text = str(error.value)
    assert f"'{path}' exists but could not be unpickled (UnpicklingError: pickle data was truncated)" in text
    assert "dataset_root_dir" not in text and "featurePath" not in text
