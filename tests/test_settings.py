"""Every setting checked before the first batch: unknown keys, types, ranges, KeyEval, the GPU asked for."""

import json
import re

import MMSA
import MMSA.run as mmsa_run
import pytest
import torch
from conftest import REPO, run_dirs
from MMSA import MMSA_run

import mmsa_emt.mmsa.config as mmsa_config
import mmsa_emt.mmsa.data as mmsa_data
import mmsa_emt.mmsa.trainer as mmsa_trainer
from mmsa_emt import settings
from mmsa_emt.cli import parse_overrides
from mmsa_emt.mmsa.config import load_config, optim_config_from_args, trial_args
from mmsa_emt.settings import SETTINGS, SettingError, check_args, checked_assign_gpu

CONFIGS = [REPO / "config" / "config_regression.json", REPO / "config" / "config_tune.json"]


@pytest.fixture
def no_data(monkeypatch):
    """MMSA's data loader, replaced by one that fails the test: an error must come before any data is read."""

    def loader(*args, **kwargs):
        raise AssertionError("the data was read: the setting was not checked before loading")

    monkeypatch.setattr(mmsa_data, "_mmsa_data_loader", loader)


def run(config_file, tmp_path, model="EMT-DLFR", **kwargs):
    kwargs.setdefault("gpu_ids", [])
    MMSA_run(model, "mosi", config_file=str(config_file), seeds=[1], num_workers=0, **run_dirs(tmp_path), **kwargs)


def nothing_written(tmp_path) -> bool:
    return not any((tmp_path / "models").iterdir()) and not (tmp_path / "results" / "normal" / "mosi.csv").exists()


def mosi_args(**overrides):
    args = load_config("EMT-DLFR", "mosi", CONFIGS[0])
    args.update(device=torch.device("cpu"), train_mode="regression", custom_feature=None, feature_T=None,
                feature_A=None, feature_V=None, cur_seed=1, **overrides)
    return args


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("overrides,message", [
    ({"modalities": []}, r"'modalities' is \[\].*non-empty list"),
    ({"learning_rate_other": -1e-3}, r"'learning_rate_other' is -0\.001.*> 0"),
    ({"learning_rate_bert": "abc"}, r"'learning_rate_bert' is 'abc'.*a number > 0"),
    ({"batch_size": "abc"}, r"'batch_size' is 'abc'.*integer >= 1"),
    ({"missing_rate": "abc"}, r"'missing_rate' is 'abc'.*three numbers in \[0, 1\]"),
    ({"KeyEval": "Acc_7"}, r"'KeyEval' is 'Acc_7'.*Mult_acc_7.*Loss\(pred_m\)"),
    ({"fused_atention": False}, r"'fused_atention' \(did you mean 'fused_attention'\?\), in .*config="),
    ({"d_model": 18}, r"d_model.*18.*heads.*4.*divisible"),
    ({"fused_views": "false"}, r"'fused_views' is 'false'.*true or false"),
])
def test_a_bad_override_fails_before_any_data_is_read(workspace, tmp_path, no_data, overrides, message):
    """MMSA_run's config= overrides are merged after the config file is read: they are checked too, before the
    data is read (the loader would fail the test) and nothing is written."""
    config = workspace()
    with pytest.raises(SettingError, match=message) as error:
        run(config, tmp_path, config=overrides)
    assert str(config) in str(error.value)  # the message names the config file
    assert nothing_written(tmp_path)


def test_unknown_key_in_the_config_file_names_file_section_and_the_closest_key(workspace, tmp_path, no_data):
    config = workspace(common={"fused_atention": False})
    with pytest.raises(SettingError, match=r"'fused_atention' \(did you mean 'fused_attention'\?\), in " +
                       re.escape(f"{config} (emt-dlfr.commonParams)")):
        run(config, tmp_path)
    config = workspace(model={"learning_rate_vidoe": 1e-3})
    with pytest.raises(SettingError, match=r"did you mean 'learning_rate_video'.*datasetParams\.mosi"):
        load_config("EMT-DLFR", "mosi", config)


def test_overrides_of_a_sweep_and_tuning_trials_are_checked(workspace, tmp_path, no_data):
    """``python -m mmsa_emt robustness --set KEY=VALUE`` (trial_args) and MMSA's tuning mode go through the same
    check; so does the search space (debugParams) of the tuning config."""
    config = workspace()
    with pytest.raises(SettingError, match=r"'fused_atention' \(did you mean 'fused_attention'\?\)"):
        trial_args("EMT-DLFR", "mosi", config, overrides=parse_overrides(["fused_atention=false"]))
    with pytest.raises(SettingError, match=r"'batch_size' is 'abc'"):
        trial_args("EMT-DLFR", "mosi", config, overrides=parse_overrides(["batch_size=abc"]))
    args = trial_args("EMT-DLFR", "mosi", config, overrides=parse_overrides(['learning_rate_bert="2e-5"']))
    assert args["learning_rate_bert"] == 2e-5
    tune = workspace(tune=True)
    with pytest.raises(SettingError, match=r"'attn_dropout' is 1\.5"):
        run(tune, tmp_path, is_tune=True, tune_times=1, config={"attn_dropout": 1.5})
    raw = json.loads(tune.read_text())
    raw["emt-dlfr"]["debugParams"]["d_paras"].append("fusion_layer")
    raw["emt-dlfr"]["debugParams"]["fusion_layer"] = [1, 2]
    tune.write_text(json.dumps(raw))
    with pytest.raises(SettingError, match=r"'fusion_layer' \(did you mean 'fusion_layers'\?\).*debugParams"):
        load_config("EMT-DLFR", "mosi", tune, tune=True)


def test_an_unknown_key_eval_fails_before_the_first_epoch(workspace, tmp_path, monkeypatch):
    """It used to raise only after the first epoch's validation; now before training starts (no epoch run, no
    checkpoint written), for EMT-DLFR and for MMSA's own models."""
    epochs = []
    monkeypatch.setattr(mmsa_trainer, "fit", lambda *a, **k: epochs.append(1))
    config = workspace(model={"KeyEval": "Accuracy"})
    with pytest.raises(SettingError, match="'KeyEval' is 'Accuracy'"):
        run(config, tmp_path)
    assert not epochs and nothing_written(tmp_path)
    with pytest.raises(SettingError, match=r"'KeyEval' is 'Loss\(pred_m\)'.*Corr, Loss \("):
        run(config, tmp_path, model="TFN", config={"KeyEval": "Loss(pred_m)"})  # ours only, not MMSA's trainers


def test_numeric_strings_are_converted_before_the_model_sees_them(workspace, tmp_path, monkeypatch):
    seen = {}

    def stop(args, num_workers=4):
        seen.update(args)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(mmsa_data, "checked_data_loader", stop)
    config = workspace()
    with pytest.raises(RuntimeError, match="stop before loading"):
        run(config, tmp_path, config={"batch_size": "8", "learning_rate_other": "1e-3", "missing_rate": "0.5",
                                      "attn_dropout": "0"})
    assert (seen["batch_size"], seen["learning_rate_other"], seen["attn_dropout"]) == (8, 1e-3, 0.0)
    assert type(seen["batch_size"]) is int and type(seen["attn_dropout"]) is float
    assert seen["missing_rate"] == [0.5, 0.5, 0.5]


def test_mmsa_models_keep_their_own_keys_and_get_the_shared_ones_checked(workspace, tmp_path, no_data):
    config = workspace()
    with pytest.raises(SettingError, match=r"'batch_size' is 0"):
        run(config, tmp_path, model="TFN", config={"batch_size": 0})
    with pytest.raises(SettingError, match=r"'learning_rate' is -1"):
        run(config, tmp_path, model="TFN", config={"learning_rate": -1})
    with pytest.raises(SettingError, match=r"'missing_rate' is \[0\.5, 2\]"):
        run(config, tmp_path, model="TFN", config={"data_missing": True, "missing_rate": [0.5, 2]})


@pytest.mark.parametrize("config_file", [*CONFIGS, "mmsa"])
def test_every_shipped_entry_passes_the_check(config_file):
    """Our configs (EMT-DLFR and the MMSA models in them) and MMSA's own pass: no key of theirs is refused."""
    path = MMSA.__path__[0] + "/config/config_regression.json" if config_file == "mmsa" else config_file
    raw = json.loads(open(path).read())
    tune = "tune" in str(path)
    checked = 0
    for model, entry in raw.items():
        datasets = [d for d in raw["datasetCommonParams"] if d != "dataset_root_dir"]
        for dataset in datasets if tune else [d for d in datasets if d in entry.get("datasetParams", {})]:
            args = load_config(model, dataset, path, tune=tune) if model != "datasetCommonParams" else None
            if args is None:
                continue
            args.update(device=torch.device("cpu"), train_mode="regression", custom_feature=None, cur_seed=1)
            mmsa_config.check_args(args)
            checked += 1
    assert checked > 40


def test_every_key_of_the_emt_dlfr_entries_is_in_the_table():
    for path in CONFIGS:
        entry = json.loads(path.read_text())["emt-dlfr"]
        keys = set(entry["commonParams"]) | {k for d in entry["datasetParams"].values() for k in d}
        keys |= set(entry.get("debugParams", {})) - {"d_paras"}
        assert keys <= set(SETTINGS), keys - set(SETTINGS)
    common = json.loads(CONFIGS[0].read_text())["datasetCommonParams"]
    assert {k for d in common.values() if isinstance(d, dict) for lay in d.values() for k in lay} <= set(SETTINGS)


def test_the_documentation_lists_every_key_as_the_table_says():
    doc = (REPO / "docs" / "configuration.md").read_text()
    for name in SETTINGS:
        assert f"`{name}`" in doc, name
    for group in settings.groups():
        assert settings.markdown_table(group) in doc, f"docs/configuration.md is out of date for {group}"


# ----------------------------------------------------------------------------------------------- the validator
@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate_other", "1e-3", 1e-3), ("learning_rate_bert", "0.5", 0.5), ("learning_rate_audio", 1, 1.0),
    ("batch_size", "8", 8), ("batch_size", 8.0, 8), ("heads", "4", 4), ("weight_decay_bert", 0, 0.0),
    ("missing_rate", 0.25, [0.25] * 3), ("missing_rate", ["0.1", 0.2, 0], [0.1, 0.2, 0.0]),
    ("missing_seed", ["1", 2, 3], [1, 2, 3]), ("modalities", ["vision", "audio"], ["vision", "audio"]),
    ("max_epochs", None, None), ("stack_modalities", False, False), ("checkpoint_fusion", "auto", "auto"),
])
def test_values_that_fit_are_converted(key, value, expected):
    args = mosi_args(**{key: value})
    check_args(args, ours=True)
    assert args[key] == expected and type(args[key]) is type(expected)


@pytest.mark.parametrize("key,value", [
    ("learning_rate_other", -1e-3), ("learning_rate_other", 0), ("learning_rate_bert", "abc"),
    ("learning_rate_bert", float("nan")), ("learning_rate_audio", True), ("weight_decay_video", -0.1),
    ("batch_size", 0), ("batch_size", "8.5"), ("batch_size", "abc"), ("batch_size", True),
    ("attn_dropout", 1.0), ("ff_dropout", -0.1), ("a_lstm_dropout", "x"),
    ("missing_rate", [0.5, 0.5]), ("missing_rate", 1.5), ("missing_rate", "abc"), ("missing_seed", [1, 2]),
    ("missing_seed", [1, 2, "x"]), ("modalities", []), ("modalities", "audio"), ("modalities", ["audio", "audio"]),
    ("modalities", ["text", "video"]), ("use_finetune", "false"), ("use_finetune", 0), ("fused_attention", "yes"),
    ("precision", "fp8"), ("stack_modalities", True), ("stack_modalities", "yes"), ("recon_loss", "Huber"),
    ("attn_act_fn", "gelu"), ("KeyEval", "Acc_2"), ("KeyEval", "CCC"), ("data_missing", False),
    ("max_epochs", 0), ("early_stop", -1), ("update_epochs", "0"), ("loss_attra_weight", -1),
])
def test_values_that_do_not_fit_are_named_with_the_key_and_value(key, value):
    args = mosi_args(**{key: value})
    with pytest.raises(SettingError) as error:
        check_args(args, ours=True)
    message = str(error.value)
    assert f"'{key}'" in message and repr(value) in message and str(CONFIGS[0]) in message


def test_unknown_keys_suggest_the_closest_known_key():
    args = mosi_args(fused_atention=True, learnign_rate_bert=1e-5, zzz=1)
    with pytest.raises(SettingError, match=r"keys for EMT-DLFR: 'fused_atention' \(did you mean 'fused_attention'\?\), "
                                           r"'learnign_rate_bert' \(did you mean 'learning_rate_bert'\?\), 'zzz', in "):
        check_args(args, ours=True)


def test_required_keys_and_cross_key_rules():
    args = mosi_args()
    del args["d_model"], args["batch_size"]
    with pytest.raises(KeyError, match=r"config keys 'd_model', 'batch_size' are missing"):
        check_args(args, ours=True)
    with pytest.raises(SettingError, match="divisible by heads"):
        check_args(mosi_args(d_model=130), ours=True)
    with pytest.raises(SettingError, match="use_bert"):
        check_args(mosi_args(use_bert=False), ours=True)
    check_args(mosi_args(use_bert=False, modalities=["audio", "vision"]), ours=True)


def test_key_eval_follows_the_dataset():
    for dataset, good, bad in [("sims", "Mult_acc_3", "Mult_acc_7"), ("mosi", "Non0_acc_2", "Mult_acc_3")]:
        args = load_config("EMT-DLFR", dataset, CONFIGS[0])
        check_args({**args, "KeyEval": good}, ours=True)
        with pytest.raises(SettingError, match=f"'KeyEval' is '{bad}'"):
            check_args({**args, "KeyEval": bad}, ours=True)


def test_translation_reads_checked_values_and_the_tables_defaults():
    args = mosi_args(learning_rate_other="2e-3")
    assert optim_config_from_args(args).lr_other == 2e-3
    with pytest.raises(SettingError, match="'learning_rate_video' is -1"):
        optim_config_from_args({**args, "learning_rate_video": -1})
    bare = {k: v for k, v in args.items() if SETTINGS[k].default is settings.REQUIRED}
    config = mmsa_config.model_config_from_args({**bare, "feature_dims": [768, 5, 20]})
    assert (config.ff_expansion, config.max_seq_len, config.modalities) == (4, 1024, ("text", "audio", "vision"))
    assert mmsa_config.speed_config_from_args(bare).precision == SETTINGS["precision"].default
    assert mmsa_config.loss_weights_from_args(bare).recon_kind == SETTINGS["recon_loss"].default


# ----------------------------------------------------------------------------------------------- GPU choice
@pytest.mark.parametrize("available,count", [(False, 0), (True, 2)])
def test_a_gpu_that_is_not_there_is_an_error(monkeypatch, available, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    have = "CUDA is not available" if not available else r"this machine has 2 CUDA GPUs \(ids 0 to 1\)"
    with pytest.raises(SettingError, match=rf"gpu_ids=\[3\]: {have}.*gpu_ids=\[\]"):
        checked_assign_gpu([3])
    with pytest.raises(SettingError, match="one GPU"):
        checked_assign_gpu([0, 1])
    if available:
        assert checked_assign_gpu([1]) == torch.device("cuda:1")
    else:
        assert checked_assign_gpu([]) == torch.device("cpu")  # the automatic choice: the CPU without a GPU


def test_mmsa_run_and_trials_refuse_a_missing_gpu(workspace, tmp_path, monkeypatch, no_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = workspace()
    with pytest.raises(SettingError, match=r"gpu_ids=\[3\]: CUDA is not available"):
        run(config, tmp_path, gpu_ids=[3])
    assert nothing_written(tmp_path)
    with pytest.raises(SettingError, match=r"gpu_ids=\[3\]"):
        trial_args("EMT-DLFR", "mosi", config, gpu_ids=[3])
    assert mmsa_run.assign_gpu is checked_assign_gpu
    assert trial_args("EMT-DLFR", "mosi", config, gpu_ids=[])["device"] == torch.device("cpu")
