"""MMSA's args translated once (``mmsa.config.translate``), each default written once (in the dataclass field that
owns it, read by the settings table), and no literal default in the adapter."""

import ast
from dataclasses import MISSING, fields

import pytest
import torch
from conftest import REPO

from mmsa_emt.dlfr import LossWeights
from mmsa_emt.fast import SpeedConfig
from mmsa_emt.mmsa.config import ARGS_FIELDS, CHECKPOINT_FIELDS, DERIVED_FIELDS, translate, trial_args
from mmsa_emt.mmsa.run_config import RunConfig, TrainingConfig
from mmsa_emt.model import EMTDLFRConfig
from mmsa_emt.settings import REQUIRED, SETTINGS
from mmsa_emt.trainer import OptimConfig

CONFIGS = (EMTDLFRConfig, OptimConfig, LossWeights, TrainingConfig)
ADAPTER = sorted((REPO / "mmsa_emt" / "mmsa").glob("*.py"))


def _field_default(config: type, name: str):
    field = next(f for f in fields(config) if f.name == name)
    if field.default is not MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not MISSING else MISSING


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_table_default_is_the_field_default():
    """A default changed in the dataclass but not in the table (or the other way) is caught here."""
    for key, (config, name) in ARGS_FIELDS.items():
        setting, default = SETTINGS[key], _field_default(config, name)
        if setting.default is REQUIRED:  # the config must give it; the field's default serves direct Python use
            continue
        assert default is not MISSING, f"{key}: the table has a default, {config.__name__}.{name} has none"
        assert _plain(setting.default) == _plain(default), f"{key} vs {config.__name__}.{name}"
    for field in fields(SpeedConfig):
        assert _plain(SETTINGS[field.name].default) == _plain(field.default), field.name


def test_every_field_is_read_from_a_setting():
    """A new field of a config dataclass needs its key in the table and in ARGS_FIELDS (or DERIVED_FIELDS)."""
    for config in CONFIGS:
        mapped = {name for owner, name in ARGS_FIELDS.values() if owner is config}
        derived = {*DERIVED_FIELDS, *CHECKPOINT_FIELDS} if config is EMTDLFRConfig else set()
        assert {f.name for f in fields(config)} == mapped | derived, config.__name__
    assert all(key in SETTINGS for key in ARGS_FIELDS)
    assert all(key in SETTINGS for keys in DERIVED_FIELDS.values() for key in keys)
    assert {f.name for f in fields(SpeedConfig)} <= set(SETTINGS)


def test_translate_fills_every_field_from_its_key(workspace):
    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"), overrides={
        "early_stop": 3, "KeyEval": "MAE", "loss_attra_weight": 0.25, "recon_loss": "MSELoss", "ff_expansion": 2,
        "learning_rate_video": 3e-4, "authors_training": True, "modalities": ["audio", "vision"]})
    run = translate(args)
    assert isinstance(run, RunConfig) and run.device == torch.device("cpu")
    parts = {EMTDLFRConfig: run.model, OptimConfig: run.optim, LossWeights: run.loss, TrainingConfig: run.training}
    for key, (config, name) in ARGS_FIELDS.items():
        if key in args:
            assert _plain(getattr(parts[config], name)) == _plain(args[key]), key
    assert (run.training.early_stop, run.training.key_eval, run.loss.attraction, run.optim.lr_vision) == \
        (3, "MAE", 0.25, 3e-4)
    assert run.model.modalities == ("audio", "vision") and run.model.audio_dim == args["feature_dims"][1]
    assert run.model.predictor_dims == {"context": args["gmc_tokens_pred_dim"], "text": args["text_pred_dim"],
                                        "audio": args["audio_pred_dim"], "vision": args["video_pred_dim"]}


def test_an_absent_optional_key_gives_the_field_default(workspace):
    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    optional = [k for k in ARGS_FIELDS if SETTINGS[k].default is not REQUIRED]
    for key in optional:
        args.pop(key, None)
    run = translate(args)
    parts = {EMTDLFRConfig: run.model, OptimConfig: run.optim, LossWeights: run.loss, TrainingConfig: run.training}
    for key in optional:
        config, name = ARGS_FIELDS[key]
        assert _plain(getattr(parts[config], name)) == _plain(_field_default(config, name)), key


def test_a_required_key_absent_is_named(workspace):
    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    del args["learning_rate_other"]
    with pytest.raises(KeyError, match="config key 'learning_rate_other' is missing"):
        translate(args)


@pytest.mark.parametrize("path", ADAPTER, ids=lambda p: p.name)
def test_no_literal_default_in_the_adapter(path):
    """``args.get("key", <literal>)`` would write a default a second time: the adapter reads the table."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "args" and len(node.args) > 1):
            assert not isinstance(node.args[1], (ast.Constant, ast.List, ast.Tuple, ast.Dict)), \
                f"{path.name}:{node.lineno}: args.get({ast.unparse(node.args[0])}, {ast.unparse(node.args[1])})"
