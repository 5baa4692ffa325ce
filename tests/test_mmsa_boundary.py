"""Only ``mmsa_emt.mmsa`` knows MMSA: no other module imports MMSA or easydict, the helpers it offers the others
behave as MMSA's keys do, and MMSA_run's trainer and a tuning trial train through one call with one config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mmsa_emt
import mmsa_emt.mmsa.trainer as mmsa_trainer
from mmsa_emt import checkpoint
from mmsa_emt.mmsa.config import feature_file, key_eval, make_args
from mmsa_emt.mmsa.run import dict_to_str, run_mmsa
from mmsa_emt.mmsa.run_config import TrainingConfig
from mmsa_emt.tuning import base_args, train_trial

PACKAGE = Path(mmsa_emt.__file__).parent
FOREIGN = ("MMSA", "easydict")  # the packages whose quirks only mmsa_emt.mmsa knows
ALLOWED = ("mmsa", "settings.py", "demo.py", "mmsa_compat.py", "configs")  # relative to the package folder


def _imported_roots(tree: ast.AST) -> set[str]:
    """Top-level package names imported by a module: import statements and importlib.import_module("...")."""
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_only_the_mmsa_subpackage_imports_mmsa_or_easydict():
    for name in ALLOWED:
        assert (PACKAGE / name).exists(), f"allow-list entry {name} is gone: update ALLOWED"
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ALLOWED:
            continue
        found = _imported_roots(ast.parse(path.read_text(encoding="utf-8"), str(path))) & set(FOREIGN)
        if found:
            offenders[str(relative)] = sorted(found)
    assert not offenders, f"these modules import MMSA/easydict themselves; go through mmsa_emt.mmsa: {offenders}"


def test_the_check_sees_every_kind_of_import():
    code = "import MMSA.run\nfrom easydict import EasyDict\nimport importlib\nimportlib.import_module('MMSA.utils')\n"
    assert _imported_roots(ast.parse(code)) >= {"MMSA", "easydict"}
    assert _imported_roots(ast.parse("from .mmsa.config import make_args\n'import MMSA'\n")) == set()


def test_mmsa_key_helpers(tmp_path):
    args = make_args({"model_name": "emt-dlfr", "featurePath": str(tmp_path / "f.pkl")})
    assert args.model_name == "emt-dlfr"  # MMSA reads its args by attribute
    assert feature_file(args) == tmp_path / "f.pkl"
    assert key_eval(args) == TrainingConfig.key_eval  # the default when the config gives none
    assert key_eval({**args, "KeyEval": "MAE"}) == "MAE"
    with pytest.raises(KeyError, match="featurePath"):
        feature_file({"model_name": "emt-dlfr"})
    assert dict_to_str({"MAE": 0.5}).strip() == "MAE: 0.5000"
    assert callable(run_mmsa)


class _Stop(Exception):
    pass


FIT_SETTINGS = ("early_stop", "max_epochs", "update_every", "key_metric", "minimize", "last_partial_group",
                "checkpoint_prefix", "device")


def test_mmsa_run_and_a_tuning_trial_train_through_one_call(workspace, tmp_path, monkeypatch):
    """The same config reaches ``fit`` the same way from MMSA_run's trainer and from a tuning trial."""
    common = {"early_stop": 3, "update_epochs": 3, "max_epochs": 4, "KeyEval": "MAE", "authors_training": True}
    calls = []

    def recorder(*args, **kwargs):
        calls.append(kwargs)
        raise _Stop

    monkeypatch.setattr(mmsa_trainer, "fit", recorder)
    with pytest.raises(_Stop):
        run_mmsa("EMT-DLFR", "mosi", config_file=str(workspace(common=common)), seeds=[1], gpu_ids=[],
                 num_workers=0, model_save_dir=tmp_path / "models", res_save_dir=tmp_path / "results",
                 log_dir=tmp_path / "logs")
    base = base_args("EMT-DLFR", "mosi", workspace(common=common, tune=True))
    with pytest.raises(_Stop):
        train_trial({"learning_rate_other": 3e-3}, base=dict(base), out_dir=str(tmp_path / "search"), seed=1,
                    num_workers=0, threads=None, device="cpu", report=lambda row: None)
    run, trial = ({k: call[k] for k in FIT_SETTINGS} for call in calls)
    assert run == trial == {"early_stop": 3, "max_epochs": 4, "update_every": 3, "key_metric": "MAE",
                            "minimize": True, "last_partial_group": "drop", "checkpoint_prefix": "Model.",
                            "device": torch.device("cpu")}
    assert calls[0]["speed"] == calls[1]["speed"] and calls[1]["speed"].precision == "fp32"
    assert calls[1]["checkpoint_meta"]["settings"]["learning_rate_other"] == 3e-3


def test_a_tuning_trial_checkpoint_carries_its_config(workspace, tmp_path):
    base = base_args("EMT-DLFR", "mosi", workspace(tune=True), {"max_epochs": 1})
    reports = []
    result = train_trial({"learning_rate_other": 3e-3, "fusion_layers": 1}, base=dict(base),
                         out_dir=str(tmp_path / "search"), seed=1, num_workers=0, threads=None, device="cpu",
                         report=reports.append)
    path = Path(result["checkpoint"])
    assert reports and reports[-1]["checkpoint"] == str(path)
    saved = checkpoint.read(path)
    assert saved.packaged and saved.config.fusion_layers == 1  # the trial's value, not the base config's
    assert saved.settings["learning_rate_other"] == 3e-3
    model = mmsa_emt.from_pretrained(path)
    assert isinstance(model, mmsa_emt.DLFR)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved.state_dict[key]), key
